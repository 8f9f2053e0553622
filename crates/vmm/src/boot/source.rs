//! What a machine booted, kept for `system_reset`, and the fact about it a migration carries
//! (the `boot` component): which kind of image, so a destination resets into the same guest
//! or refuses to.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::kernel::KernelImage;
use crate::vm::GuestImage;

/// An owned copy of the image a machine booted.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// The test guest.
    Builtin,
    /// An ELF entered directly.
    Elf(Vec<u8>),
    /// Raw code.
    Raw {
        /// Load address and entry.
        load: u64,
        /// The code.
        code: Vec<u8>,
    },
    /// A kernel (`--kernel`).
    Kernel(Arc<KernelImage>),
}

/// The kind of image, as migrated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootKind {
    /// The test guest (also what a stream without the `boot` component means).
    #[default]
    Builtin,
    /// Test code (`Elf`, `Raw`): a destination cannot know it.
    Custom,
    /// A kernel, its initrd's size and the protocol (a destination given another kernel does
    /// not reset into it).
    Kernel {
        /// Kernel file size.
        kernel_bytes: u64,
        /// Initrd size (0: none).
        initrd_bytes: u64,
    },
}

impl BootSource {
    /// An owned copy of `image`.
    pub fn from_image(image: GuestImage<'_>) -> Self {
        match image {
            GuestImage::Builtin => BootSource::Builtin,
            GuestImage::Elf(e) => BootSource::Elf(e.to_vec()),
            GuestImage::Raw { load, code } => BootSource::Raw {
                load,
                code: code.to_vec(),
            },
            GuestImage::Kernel(k) => BootSource::Kernel(Arc::new(k.clone())),
        }
    }

    /// The image to load.
    pub fn image(&self) -> GuestImage<'_> {
        match self {
            BootSource::Builtin => GuestImage::Builtin,
            BootSource::Elf(e) => GuestImage::Elf(e),
            BootSource::Raw { load, code } => GuestImage::Raw { load: *load, code },
            BootSource::Kernel(k) => GuestImage::Kernel(k),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> BootKind {
        match self {
            BootSource::Builtin => BootKind::Builtin,
            BootSource::Elf(_) | BootSource::Raw { .. } => BootKind::Custom,
            BootSource::Kernel(k) => BootKind::Kernel {
                kernel_bytes: k.kernel.len() as u64,
                initrd_bytes: k.initrd.as_ref().map_or(0, |i| i.len() as u64),
            },
        }
    }
}

/// What a destination that was given `here` resets into after loading a source that booted
/// `source`: the same kind of image or nothing (a reset is then refused).
pub fn adopt(here: Option<BootSource>, source: &BootKind) -> Option<BootSource> {
    match (here, source) {
        (_, BootKind::Builtin) => Some(BootSource::Builtin),
        (Some(h), s) if h.kind() == *s && *s != BootKind::Custom => Some(h),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_resets_only_into_the_source_s_kind_of_image() {
        let k = |n: usize| {
            BootSource::Kernel(Arc::new(KernelImage {
                kernel: vec![0; n],
                ..Default::default()
            }))
        };
        assert!(matches!(
            adopt(None, &BootKind::Builtin),
            Some(BootSource::Builtin)
        ));
        assert!(matches!(
            adopt(Some(k(5)), &BootKind::Builtin),
            Some(BootSource::Builtin)
        ));
        assert!(adopt(Some(BootSource::Builtin), &k(5).kind()).is_none());
        assert!(adopt(None, &k(5).kind()).is_none());
        assert!(adopt(Some(k(6)), &k(5).kind()).is_none());
        assert!(matches!(
            adopt(Some(k(5)), &k(5).kind()),
            Some(BootSource::Kernel(_))
        ));
        let raw = BootSource::Raw {
            load: 0,
            code: vec![1],
        };
        assert!(adopt(Some(raw.clone()), &raw.kind()).is_none());
    }
}

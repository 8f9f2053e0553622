//! Saving and restoring the machine, one component at a time.
//!
//! Every component implements [`Persist`]: an id, a version, a plain serde state struct, and
//! mandatory `save`/`restore` (no defaults: a component without them does not compile). States
//! travel as [`ComponentState`]s whose payload is the postcard encoding of the state struct.

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod machine;
pub mod snapshot;
pub mod vm;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A machine component whose state can be saved and restored.
pub trait Persist {
    /// Component id in the stream (e.g. `"cpu"`).
    const ID: &'static str;
    /// Version of [`Persist::State`]'s encoding; a restore rejects newer versions.
    const VERSION: u32;
    /// The saved state.
    type State: Serialize + DeserializeOwned;

    /// Reads the component's complete state.
    fn save(&self) -> Result<Self::State>;

    /// Puts `state` into the component.
    fn restore(&mut self, state: &Self::State) -> Result<()>;
}

/// One component's saved state as it travels in a migration stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentState {
    /// [`Persist::ID`].
    pub id: String,
    /// Instance number (vCPU index; 0 for singletons).
    pub instance: u32,
    /// [`Persist::VERSION`] of the saver.
    pub version: u32,
    /// postcard encoding of [`Persist::State`].
    pub data: Vec<u8>,
}

/// Saves `component` as instance `instance`.
pub fn save_component<P: Persist>(component: &P, instance: u32) -> Result<ComponentState> {
    let state = component.save()?;
    let data = postcard::to_allocvec(&state).map_err(|source| Error::Codec {
        id: P::ID.to_string(),
        instance,
        source,
    })?;
    Ok(ComponentState {
        id: P::ID.to_string(),
        instance,
        version: P::VERSION,
        data,
    })
}

/// Checks id and version of `c` for `P` and decodes its payload.
pub fn decode_component<P: Persist>(c: &ComponentState) -> Result<P::State> {
    if c.id != P::ID {
        return Err(Error::component(
            &c.id,
            c.instance,
            format!("expected component {}", P::ID),
        ));
    }
    if c.version > P::VERSION {
        return Err(Error::component(
            &c.id,
            c.instance,
            format!(
                "version {} is newer than this VMM's {}",
                c.version,
                P::VERSION
            ),
        ));
    }
    let (state, rest) =
        postcard::take_from_bytes::<P::State>(&c.data).map_err(|source| Error::Codec {
            id: c.id.clone(),
            instance: c.instance,
            source,
        })?;
    if !rest.is_empty() {
        return Err(Error::component(
            &c.id,
            c.instance,
            format!("{} trailing bytes after the state", rest.len()),
        ));
    }
    Ok(state)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// save → encode → decode → restore into `fresh` → save again: both encodings must match
    /// after `normalize` (which zeroes fields that legitimately move, like time). Returns the
    /// two states before normalisation.
    pub fn round_trip<P: Persist>(
        original: &P,
        fresh: &mut P,
        normalize: impl Fn(&mut P::State),
    ) -> (P::State, P::State) {
        let saved = save_component(original, 0).unwrap();
        fresh
            .restore(&decode_component::<P>(&saved).unwrap())
            .unwrap();
        let resaved = save_component(fresh, 0).unwrap();
        let (mut first, mut second) = (
            decode_component::<P>(&saved).unwrap(),
            decode_component::<P>(&resaved).unwrap(),
        );
        let raw = (
            decode_component::<P>(&saved).unwrap(),
            decode_component::<P>(&resaved).unwrap(),
        );
        normalize(&mut first);
        normalize(&mut second);
        assert_eq!(
            postcard::to_allocvec(&first).unwrap(),
            postcard::to_allocvec(&second).unwrap(),
            "{}: state changed across save → restore → save",
            P::ID
        );
        raw
    }
}

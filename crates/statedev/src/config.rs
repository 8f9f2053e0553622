//! `--device statedev,size=300M,setup-ms=1400[,...]`.

use crate::error::StateDevError;

/// Smallest device state (one page).
pub const MIN_SIZE: u64 = 4096;
/// Largest device state accepted (a 64 GiB test device is already absurd).
pub const MAX_SIZE: u64 = 64 << 30;
/// Largest dirty-tracking chunk.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Longest accepted `setup-ms` (one hour).
const MAX_SETUP_MS: u64 = 3_600_000;
/// Highest accepted `dirty-rate` (chunks per second).
const MAX_DIRTY_RATE: u64 = 1_000_000;

/// Configuration of one state device. Both sides of a migration use the same options; the
/// destination checks the stream's `size` against its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDevConfig {
    /// `size=`: bytes of device state (K/M/G binary suffixes; a multiple of 4 KiB).
    pub size: u64,
    /// `chunk=`: dirty-tracking granularity (default 1 MiB, a multiple of 4 KiB, at most `size`
    /// after clamping: a device smaller than 1 MiB is one chunk).
    pub chunk_size: u64,
    /// `setup-ms=`: destination hardware-setup latency added to the preparation (default 0).
    pub setup_ms: u64,
    /// `dirty-rate=`: chunks the device rewrites per second while it runs (one 4 KiB page in
    /// each, default 10; 0 = static state).
    pub dirty_rate: u64,
    /// `seed=`: seed of the initial content and of the mutations (default 1).
    pub seed: u64,
    /// `hang=on|off`: the destination preparation never finishes (default off).
    pub hang: bool,
    /// `instance=`: the engine's instance number (default 0).
    pub instance: u32,
}

impl StateDevConfig {
    /// A configuration with the defaults and `size` bytes of state (must be valid: use
    /// [`StateDevConfig::parse`] for user input).
    pub fn with_size(size: u64) -> Self {
        Self {
            size,
            chunk_size: (1 << 20).min(size),
            setup_ms: 0,
            dirty_rate: 10,
            seed: 1,
            hang: false,
            instance: 0,
        }
    }

    /// Parses `size=300M,setup-ms=1400[,chunk=1M][,dirty-rate=10][,seed=1][,hang=on][,instance=0]`.
    /// A leading `statedev,` (the CLI's device name) is accepted. `size` is mandatory; keys may
    /// appear once.
    pub fn parse(s: &str) -> Result<Self, StateDevError> {
        let mut items = s.split(',').peekable();
        if items.peek() == Some(&"statedev") {
            items.next();
        }
        let mut size = None;
        let mut chunk = None;
        let mut cfg = Self::with_size(MIN_SIZE);
        let mut seen: Vec<&str> = Vec::new();
        for item in items.filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                err(
                    item,
                    "expected key=value (keys: size, chunk, setup-ms, dirty-rate, seed, hang, instance)",
                )
            })?;
            if seen.contains(&key) {
                return Err(err(key, "given twice"));
            }
            seen.push(key);
            match key {
                "size" => size = Some(parse_size(key, value)?),
                "chunk" => chunk = Some(parse_size(key, value)?),
                "setup-ms" => cfg.setup_ms = parse_num(key, value, MAX_SETUP_MS)?,
                "dirty-rate" => cfg.dirty_rate = parse_num(key, value, MAX_DIRTY_RATE)?,
                "seed" => cfg.seed = parse_num(key, value, u64::MAX)?,
                "instance" => cfg.instance = parse_num(key, value, u64::from(u32::MAX))? as u32,
                "hang" => {
                    cfg.hang = match value {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(err(key, format!("'{value}' is not on or off"))),
                    }
                }
                _ => {
                    return Err(err(
                        key,
                        "unknown option (keys: size, chunk, setup-ms, dirty-rate, seed, hang, instance)",
                    ))
                }
            }
        }
        cfg.size = size.ok_or_else(|| err("size", "missing (e.g. size=300M)"))?;
        cfg.chunk_size = match chunk {
            Some(c) => c,
            None => (1 << 20).min(cfg.size),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every bound (also for configurations built in code).
    pub fn validate(&self) -> Result<(), StateDevError> {
        if self.size < MIN_SIZE || self.size > MAX_SIZE || !self.size.is_multiple_of(4096) {
            return Err(err(
                "size",
                format!(
                    "{} is not a multiple of 4 KiB between 4 KiB and {} GiB",
                    self.size,
                    MAX_SIZE >> 30
                ),
            ));
        }
        if self.chunk_size < 4096
            || self.chunk_size > MAX_CHUNK
            || !self.chunk_size.is_multiple_of(4096)
        {
            return Err(err(
                "chunk",
                format!(
                    "{} is not a multiple of 4 KiB between 4 KiB and {} MiB",
                    self.chunk_size,
                    MAX_CHUNK >> 20
                ),
            ));
        }
        if self.chunk_size > self.size {
            return Err(err(
                "chunk",
                format!(
                    "{} is larger than the device ({} bytes)",
                    self.chunk_size, self.size
                ),
            ));
        }
        if self.setup_ms > MAX_SETUP_MS {
            return Err(err("setup-ms", format!("more than {MAX_SETUP_MS}")));
        }
        if self.dirty_rate > MAX_DIRTY_RATE {
            return Err(err("dirty-rate", format!("more than {MAX_DIRTY_RATE}")));
        }
        Ok(())
    }

    /// Number of dirty-tracking chunks (the last one may be shorter).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }
}

fn err(key: &str, reason: impl Into<String>) -> StateDevError {
    StateDevError::Config {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn parse_num(key: &str, value: &str, max: u64) -> Result<u64, StateDevError> {
    let n: u64 = value
        .parse()
        .map_err(|_| err(key, format!("'{value}' is not a number")))?;
    if n > max {
        return Err(err(key, format!("{n} is more than {max}")));
    }
    Ok(n)
}

/// `4096`, `64K`, `300M`, `2G` (binary multiples, optional trailing `B`/`iB`).
fn parse_size(key: &str, value: &str) -> Result<u64, StateDevError> {
    let v = value
        .strip_suffix("iB")
        .or_else(|| value.strip_suffix('B'))
        .unwrap_or(value);
    let (digits, shift) = match v.char_indices().last() {
        Some((i, 'k' | 'K')) => (&v[..i], 10),
        Some((i, 'm' | 'M')) => (&v[..i], 20),
        Some((i, 'g' | 'G')) => (&v[..i], 30),
        _ => (v, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| err(key, format!("'{value}' is not a size (e.g. 300M)")))?;
    n.checked_mul(1 << shift)
        .filter(|b| *b <= MAX_SIZE)
        .ok_or_else(|| err(key, format!("'{value}' is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cli_spelling() {
        let c = StateDevConfig::parse("statedev,size=300M,setup-ms=1400").unwrap();
        assert_eq!(c.size, 300 << 20);
        assert_eq!(c.setup_ms, 1400);
        assert_eq!(c.chunk_size, 1 << 20);
        assert_eq!(c.dirty_rate, 10);
        assert!(!c.hang);
        let c = StateDevConfig::parse("size=64K,chunk=16K,dirty-rate=0,seed=9,hang=on,instance=2")
            .unwrap();
        assert_eq!(
            (c.size, c.chunk_size, c.dirty_rate),
            (64 << 10, 16 << 10, 0)
        );
        assert_eq!((c.seed, c.hang, c.instance), (9, true, 2));
        assert_eq!(c.chunks(), 4);
        // A device below 1 MiB is one chunk by default.
        assert_eq!(
            StateDevConfig::parse("size=8K").unwrap().chunk_size,
            8 << 10
        );
        assert_eq!(StateDevConfig::parse("size=2GiB").unwrap().size, 2 << 30);
    }

    #[test]
    fn rejects_with_clear_errors() {
        let cases = [
            ("", "size"),
            ("setup-ms=5", "missing"),
            ("size=300X", "not a size"),
            ("size=100", "multiple of 4 KiB"),
            ("size=1000G", "too large"),
            ("size=1M,chunk=3K", "chunk"),
            ("size=1M,chunk=2M", "larger than the device"),
            ("size=1M,setup-ms=-1", "not a number"),
            ("size=1M,hang=maybe", "not on or off"),
            ("size=1M,colour=red", "unknown option"),
            ("size=1M,size=2M", "given twice"),
            ("size=1M,bare", "key=value"),
            ("size=1M,dirty-rate=99999999", "more than"),
        ];
        for (input, needle) in cases {
            let e = StateDevConfig::parse(input).unwrap_err().to_string();
            assert!(e.contains(needle), "{input:?}: {e}");
        }
    }
}

//! Command-line values that are read and checked while the flags are parsed, so that
//! a bad one is a flag error naming the flag: the admission key (`--admission-key
//! FILE`) and addresses as users write them (`HOST:PORT`, resolved).

use std::path::Path;

/// An admission key's bytes. Its `Debug` form does not show them.
#[derive(Clone)]
pub struct Key(pub Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// Reads the key file named by a flag's value.
pub fn key_file(path: &str) -> Result<Key, String> {
    inagg_worker::read_admission_key(Path::new(path))
        .map(Key)
        .map_err(|e| e.to_string())
}

/// Resolves a `HOST:PORT` flag value ([`inagg_worker::resolve`]).
pub fn address(s: &str) -> Result<std::net::SocketAddr, String> {
    inagg_worker::resolve(s).map_err(|e| format!("not a HOST:PORT address that resolves: {e}"))
}

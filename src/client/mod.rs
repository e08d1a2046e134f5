//! The client library the CLI and the tests use: connecting (TLS, tokens, HTTP/2 sizes) and
//! same-host shared memory. Speaks only the protocol (`proto`, `wire`); never imports the
//! server, the service or the engine.

pub mod connect;
pub mod shm;
pub mod stream;

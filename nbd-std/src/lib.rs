//! # nbd-std
//!
//! The std shell of the NBD core: a TCP and unix-socket server over
//! storage backends, and the `nbd-std` command-line tool.
//!
//! - [`backend`]: the [`Backend`](backend::Backend) trait users implement
//!   for their own storage, and the `memory` and `file` backends;
//! - [`export`]: export descriptions as the command line gives them
//!   (`memory:1G,desc=scratch`, `file:disk.img,ro`) and the catalog served;
//! - [`server`]: the listener and the per-connection driver of the core;
//! - [`client`]: an async client (one or several connections per export,
//!   many requests in flight), NBD URIs, export listing and description;
//! - [`tls`]: TLS settings for the server and `nbds://` clients (rustls);
//! - [`tools`]: the client commands of the tool (`info`, `cp`).
//! - [`bridge`]: pairs NBD clients with browser-hosted exports that
//!   connect out over WebSocket (`nbd-std bridge`).

pub mod activation;
pub mod backend;
pub mod bridge;
pub mod captive;
pub mod check;
pub mod client;
pub mod export;
pub mod metrics;
pub mod server;
pub mod size;
pub mod tls;
pub mod tools;

/// TCP port an NBD server listens on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = nbd_core::wire::DEFAULT_PORT;

//! # nbd-std
//!
//! The std shell of the NBD core: a TCP and unix-socket server over
//! storage backends, an async client, and the `nbd-std` command-line tool.
//!
//! Each part is behind a cargo feature (in brackets); the default, `cli`,
//! is all of them plus the binary, so a library user who wants one part
//! turns the default off and builds only that part's dependencies.
//!
//! - [`backend`] (always): the [`Backend`](backend::Backend) trait users
//!   implement for their own storage, and the `memory` and `file` backends;
//! - [`export`] (`server`): export descriptions as the command line gives
//!   them (`memory:1G,desc=scratch`, `file:disk.img,ro`) and the catalog
//!   served;
//! - [`server`] (`server`): the listener and the per-connection driver of
//!   the core; [`metrics`], [`activation`] and [`captive`] serve it;
//! - [`client`] (`client`): an async client (one or several connections
//!   per export, many requests in flight), NBD URIs, export listing and
//!   description;
//! - [`tls`] (`tls`): TLS settings for the server and `nbds://` clients
//!   (rustls); without it the server refuses `NBD_OPT_STARTTLS` and
//!   `nbds://` URIs fail at the TLS hand-over;
//! - [`tools`] (`tools`; `mount` adds FUSE): the client commands of the
//!   tool (`info`, `cp`, `mount`);
//! - [`check`] (`check`): the conformance checker (`nbd-std check`);
//! - [`bridge`] (`bridge`): pairs NBD clients with browser-hosted exports
//!   that connect out over WebSocket (`nbd-std bridge`).

#[cfg(feature = "server")]
pub mod activation;
mod average;
pub mod backend;
#[cfg(feature = "bridge")]
pub mod bridge;
#[cfg(feature = "server")]
pub mod captive;
#[cfg(feature = "check")]
pub mod check;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod export;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
pub mod size;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tools")]
pub mod tools;

/// TCP port an NBD server listens on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = nbd_core::wire::DEFAULT_PORT;

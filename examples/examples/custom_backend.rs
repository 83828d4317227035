//! Serving your own storage: implement `nbd_std::backend::Backend` and
//! hand it to the server. Here, the smallest useful backend: a fixed-size
//! RAM disk in one `Vec`.
//!
//! ```text
//! cargo run -p nbd-examples --example custom_backend -- [PORT]
//! nbdinfo nbd://127.0.0.1:10809/vec
//! ```

use std::io;
use std::sync::{Arc, RwLock};

use nbd_core::export::Capabilities;
use nbd_std::backend::Backend;
use nbd_std::export::{ExportSet, ServedExport};
use nbd_std::server::{Listener, Server};

/// A fixed-size RAM disk in one Vec.
#[derive(Debug)]
struct VecDisk(RwLock<Vec<u8>>);

impl VecDisk {
    fn new(size: usize) -> Self {
        Self(RwLock::new(vec![0; size]))
    }

    fn lock_error() -> io::Error {
        io::Error::other("disk lock poisoned")
    }
}

impl Backend for VecDisk {
    fn size(&self) -> u64 {
        self.0.read().map_or(0, |disk| disk.len() as u64)
    }

    /// Flush is truthful (RAM has nothing to persist), and one shared Vec
    /// makes multi-conn safe. Everything else is left to the defaults
    /// (write zeroes by writing zero buffers, block status "all data").
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            write_zeroes: true,
            multi_conn: true,
            ..Capabilities::NONE
        }
    }

    fn may_block(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let disk = self.0.read().map_err(|_| Self::lock_error())?;
        // The protocol core has checked the range against `size()`.
        let start = offset as usize;
        buf.copy_from_slice(&disk[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.0.write().map_err(|_| Self::lock_error())?;
        let start = offset as usize;
        disk[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(nbd_std::DEFAULT_PORT);
    let export = ServedExport {
        name: "vec".to_owned(),
        description: "a Vec<u8> behind the Backend trait".to_owned(),
        read_only: false,
        writers: nbd_std::export::WriterPolicy::Shared,
        backend: Arc::new(VecDisk::new(16 << 20)),
    };
    let server = Server::new(
        ExportSet::new(vec![export]),
        nbd_core::server::Config::default(),
    );
    let listener = Listener::bind_tcp("127.0.0.1", port).await?;
    eprintln!("serving a 16 MiB Vec on 127.0.0.1:{port}; Ctrl-C to stop");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    server.run(listener, stopped).await
}

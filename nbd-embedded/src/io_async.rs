//! An async shell over [`embedded_io_async`] streams (feature `async`): the
//! same loop as [`crate::io`], for executors such as Embassy, where a TCP
//! socket of `embassy-net` (or any async stream) is the transport.
//!
//! The card is still driven synchronously (`embedded_sdmmc::BlockDevice`
//! blocks): a request's card access runs to completion inside the task,
//! and other tasks run while the stream waits for the client.

use embedded_io_async::{Read, Write};
use embedded_sdmmc::BlockDevice;
use nbd_core::export::Catalog;
use nbd_core::server::{CloseReason, Config, Connection, SmallConnection};

use crate::driver::{Driver, Error, make_room};
use crate::storage::BlockStorage;

/// Serves one client on `io` with a [`SmallConnection`] until it
/// disconnects: `Ok(Some(reason))` after a goodbye (`NBD_CMD_DISC`,
/// `NBD_OPT_ABORT`), `Ok(None)` when the stream ended without one.
///
/// Input is read into `buffer` (any length from 1 byte; write payloads are
/// handed to the card in pieces of at most its length, so 512 bytes or more
/// avoid extra read-modify-write). Requests are carried out synchronously
/// against `storage` as they arrive; replies are written at once, read data
/// one block at a time. `storage` keeps the device between clients.
pub async fn serve<C, D, T>(
    config: Config,
    catalog: C,
    storage: &mut BlockStorage<D>,
    io: T,
    buffer: &mut [u8],
) -> Result<Option<CloseReason>, Error<T::Error>>
where
    C: Catalog,
    D: BlockDevice,
    T: Read + Write,
{
    serve_connection(SmallConnection::new(catalog, config), storage, io, buffer).await
}

/// [`serve`] with a connection of any size.
pub async fn serve_connection<C, D, T, const REQUESTS: usize, const BUFFER: usize>(
    conn: Connection<C, REQUESTS, BUFFER>,
    storage: &mut BlockStorage<D>,
    mut io: T,
    buffer: &mut [u8],
) -> Result<Option<CloseReason>, Error<T::Error>>
where
    C: Catalog,
    D: BlockDevice,
    T: Read + Write,
{
    let mut driver = Driver::<C, D, REQUESTS, BUFFER>::new(conn);
    let (mut start, mut end) = (0, 0);
    loop {
        let (used, close) = driver.input(storage, &buffer[start..end])?;
        start += used;
        let sent = send(&mut driver, storage, &mut io).await?;
        if let Some(reason) = close {
            io.flush().await.map_err(Error::Transport)?;
            info!("client said goodbye");
            return Ok(Some(reason));
        }
        if used > 0 || sent {
            continue;
        }
        (start, end) = make_room(buffer, start, end)?;
        io.flush().await.map_err(Error::Transport)?;
        let n = io
            .read(&mut buffer[end..])
            .await
            .map_err(Error::Transport)?;
        if n == 0 {
            driver.end_of_input();
            return Ok(None);
        }
        end += n;
    }
}

/// Writes every message the core has, payloads included. Returns whether
/// anything was written.
async fn send<C, D, T, const REQUESTS: usize, const BUFFER: usize>(
    driver: &mut Driver<C, D, REQUESTS, BUFFER>,
    storage: &mut BlockStorage<D>,
    io: &mut T,
) -> Result<bool, Error<T::Error>>
where
    C: Catalog,
    D: BlockDevice,
    T: Write,
{
    let mut sent = false;
    while let Some(parts) = driver.next_message(storage) {
        sent = true;
        for part in parts {
            io.write_all(part).await.map_err(Error::Transport)?;
        }
        while let Some(piece) = driver.payload(storage)? {
            let n = piece.len();
            io.write_all(piece).await.map_err(Error::Transport)?;
            driver.advance(n)?;
        }
    }
    Ok(sent)
}

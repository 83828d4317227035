//! The handshake and option haggling, driven through the core's client
//! state machine one message at a time: enter transmission (`NBD_OPT_GO`),
//! describe an export (`NBD_OPT_INFO`) or list the exports (`NBD_OPT_LIST`).

use nbd_core::client::{Config, Event, ExportInfo, Mode, ProtocolError, StdConnection, TlsPolicy};
use nbd_core::wire::{Info, OptionCode, OptionReplyType};
use tokio::time::{Duration, timeout};

use super::error::{Error, Result};
use super::transport::{TlsConfig, Transport};
use super::uri::NbdUri;
use super::{ExportDetails, ListedExport};
use nbd_core::client::BASE_ALLOCATION;

/// Bytes read from the socket at once while negotiating.
const NEGOTIATION_BUFFER: usize = 64 * 1024;

/// How long to wait for the server to acknowledge `NBD_OPT_ABORT` after
/// an info or list query (the answer is already in hand).
const ABORT_WAIT: Duration = Duration::from_secs(2);

/// Everything negotiation produced.
#[derive(Debug, Default)]
pub(crate) struct Negotiated {
    pub(crate) export: Option<ExportInfo>,
    pub(crate) canonical_name: Option<String>,
    pub(crate) description: Option<String>,
    /// Metadata contexts: selected (with ids) or listed (id 0).
    pub(crate) contexts: Vec<(u32, String)>,
    pub(crate) list: Vec<ListedExport>,
    /// Bytes the server sent after negotiation ended, for the driver.
    pub(crate) leftover: Vec<u8>,
    ready: bool,
    /// `NBD_OPT_STARTTLS` acknowledged: the handshake is due.
    start_tls: bool,
    closed: bool,
    refused: Option<Error>,
}

impl Negotiated {
    /// The export description, once `NBD_OPT_GO`/`NBD_OPT_INFO` answered.
    pub(crate) fn details(&self, name: &str) -> Result<ExportDetails> {
        let export = self
            .export
            .ok_or(Error::Protocol(ProtocolError::MissingExportInfo))?;
        Ok(ExportDetails {
            name: name.to_owned(),
            canonical_name: self.canonical_name.clone(),
            description: self.description.clone(),
            export,
            meta_contexts: self.contexts.iter().map(|(_, n)| n.clone()).collect(),
        })
    }

    /// The id of `base:allocation`, if it was selected.
    pub(crate) fn base_allocation(&self) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, name)| name == BASE_ALLOCATION)
            .map(|(id, _)| *id)
    }
}

/// The configuration for `mode` on `uri`: every feature the core offers
/// (extended headers, else structured replies; `base:allocation`; block
/// sizes, name and description); TLS first, insisted on, for `nbds` URIs.
pub(crate) fn config(uri: &NbdUri, mode: Mode) -> Config<'_> {
    let tls = match uri.tls {
        Some(_) => TlsPolicy::Required,
        None => TlsPolicy::Disabled,
    };
    let mut config = Config::new(&uri.export).with_mode(mode).with_tls(tls);
    config.request_name = true;
    config.request_description = true;
    config.request_block_size = true;
    if mode == Mode::Info {
        // No query: list every context the server has.
        config.meta_contexts = &[];
    }
    config
}

/// Opens `uri` and negotiates in `mode`, within the connect timeout; a
/// TLS handshake uses (and on first use builds) `tls`.
pub(crate) async fn open(
    uri: &NbdUri,
    mode: Mode,
    tls: &TlsConfig,
) -> Result<(Transport, Box<StdConnection>, Negotiated)> {
    let work = async {
        let mut transport = Transport::connect(uri).await?;
        // The only configuration error possible here: a name over 4096 bytes.
        let mut conn = Box::new(
            StdConnection::new(config(uri, mode))
                .map_err(|_| Error::NameTooLong(uri.export.len()))?,
        );
        let negotiated = match negotiate(&mut transport, &mut conn, uri, mode, tls).await {
            Ok(negotiated) => negotiated,
            Err(error) => return Err(transport.explain(error, &uri.address())),
        };
        Ok((transport, conn, negotiated))
    };
    timeout(super::transport::CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| Error::Timeout {
            address: uri.address(),
        })?
}

/// Ends a session that entered transmission without using it: sends
/// `NBD_CMD_DISC` and closes (errors do not matter any more).
pub(crate) async fn hang_up(transport: &mut Transport, conn: &mut StdConnection) {
    if conn.disconnect().is_ok() {
        let mut out = Vec::new();
        while let Some(transmit) = conn.poll_transmit() {
            for part in transmit.parts {
                out.extend_from_slice(part);
            }
        }
        let _ = transport.write_all(&out).await;
    }
    let _ = transport.shutdown().await;
}

/// Runs the negotiation until transmission begins (`Mode::Go`) or the
/// query is answered (`Mode::Info`, `Mode::List`).
async fn negotiate(
    transport: &mut Transport,
    conn: &mut StdConnection,
    uri: &NbdUri,
    mode: Mode,
    tls: &TlsConfig,
) -> Result<Negotiated> {
    let mut out = Vec::new();
    let mut input = vec![0u8; NEGOTIATION_BUFFER];
    let mut end = 0;
    let mut got = Negotiated::default();
    let mut answered = false;
    loop {
        out.clear();
        while let Some(transmit) = conn.poll_transmit() {
            for part in transmit.parts {
                out.extend_from_slice(part);
            }
        }
        if !out.is_empty() {
            transport.write_all(&out).await.map_err(Error::io)?;
        }
        if let Some(error) = got.refused.take() {
            // NBD_OPT_ABORT went out with the flush above.
            return Err(error);
        }
        if got.ready {
            got.leftover = input[..end].to_vec();
            return Ok(got);
        }
        if got.closed {
            return finish(got, mode);
        }
        if answered {
            // The answer is in; the abort just sent needs no reply.
            let _ = timeout(ABORT_WAIT, transport.read(&mut input)).await;
            return finish(got, mode);
        }
        let read = match transport.read(&mut input[end..]).await {
            Ok(read) => read,
            // Some servers (nbd-server) reset the connection at NBD_OPT_ABORT.
            Err(error) => {
                return match conn.end_of_input() {
                    Ok(()) => finish(got, mode),
                    Err(_) => Err(Error::io(error)),
                };
            }
        };
        if read == 0 {
            return match conn.end_of_input() {
                Ok(()) => finish(got, mode),
                Err(error) => Err(protocol_error(error, uri)),
            };
        }
        end += read;
        let mut start = 0;
        loop {
            // Called with no input too: one message may carry two events.
            let step = conn
                .process(&input[start..end])
                .map_err(|error| protocol_error(error, uri))?;
            start += step.consumed;
            let Some(event) = step.event else { break };
            handle(event, &mut got, uri);
            if got.ready || got.start_tls {
                break;
            }
        }
        input.copy_within(start..end, 0);
        end -= start;
        if got.start_tls {
            got.start_tls = false;
            if end != 0 {
                // Only the server's TLS handshake may follow its
                // acknowledgement, and that waits for our ClientHello.
                return Err(Error::TlsHandshake {
                    address: uri.address(),
                    reason: "the server sent data between its STARTTLS acknowledgement and the TLS handshake".into(),
                });
            }
            transport.start_tls(uri, tls).await?;
            continue;
        }
        answered = match mode {
            Mode::Info => got.export.is_some(),
            _ => false,
        };
    }
}

fn finish(got: Negotiated, mode: Mode) -> Result<Negotiated> {
    match mode {
        Mode::Go => Err(Error::Closed {
            reason: "negotiation ended before the export was selected".into(),
        }),
        Mode::Info if got.export.is_none() => Err(Error::Closed {
            reason: "negotiation ended before the export was described".into(),
        }),
        _ => Ok(got),
    }
}

fn protocol_error(error: ProtocolError, uri: &NbdUri) -> Error {
    match error {
        // NBD_OPT_EXPORT_NAME has no error reply: the server just closes.
        ProtocolError::ExportRefused => Error::NoSuchExport {
            name: uri.export.clone(),
            message: "the server closed the connection after NBD_OPT_EXPORT_NAME".into(),
        },
        ProtocolError::UnexpectedEof => Error::Closed {
            reason: "during negotiation".into(),
        },
        other => Error::Protocol(other),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn handle(event: Event<'_>, got: &mut Negotiated, uri: &NbdUri) {
    match event {
        Event::ListEntry { name, description } => got.list.push(ListedExport {
            name: text(name),
            description: text(description),
        }),
        Event::MetaContext { id, name } => got.contexts.push((id, text(name))),
        Event::Info(Info::Name(name)) => got.canonical_name = Some(text(name)),
        Event::Info(Info::Description(description)) => {
            got.description = Some(text(description));
        }
        Event::Export(export) => got.export = Some(export),
        Event::Ready => got.ready = true,
        Event::StartTls => got.start_tls = true,
        Event::Closed => got.closed = true,
        Event::OptionRefused {
            option,
            reply_type,
            message,
        } => {
            let message = text(message);
            got.refused = Some(match (option, reply_type) {
                (_, OptionReplyType::ErrTlsRequired) => Error::TlsRequired { message },
                (
                    OptionCode::Go | OptionCode::Info | OptionCode::ExportName,
                    OptionReplyType::ErrUnknownExport,
                ) => Error::NoSuchExport {
                    name: uri.export.clone(),
                    message,
                },
                _ => Error::OptionRefused {
                    option,
                    reply: reply_type,
                    message,
                },
            });
        }
        _ => {}
    }
}

//! `NbdServer`: the server state machine for JavaScript.

use js_sys::Array;
use nbd_core::server::{
    CloseReason, Config, Connection, Event, Payload, ReadOutcome, Request, RequestId,
};
use nbd_core::shape::RequestMap;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsError, JsValue};

use crate::catalog::OwnedCatalog;
use crate::js::{Obj, extents_from_js, get_bool, get_u64, parse_error};

type Conn = Connection<OwnedCatalog, 128, 16384>;

/// One NBD server connection, sans I/O: feed it the client's bytes with
/// `push`, act on the events it returns (storage requests), answer them
/// with the `complete*` methods in any order, and send what `takeOutput`
/// returns.
///
/// Input is buffered inside: `push` keeps whatever the core could not
/// consume yet (for instance while 128 requests are in flight), and `poll`
/// processes it again after completions.
#[wasm_bindgen]
#[derive(Debug)]
pub struct NbdServer {
    conn: Conn,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Length of every read the shell has not answered yet.
    reads: RequestMap<u64>,
    /// Read data supplied by `completeRead`, until its reply is encoded.
    read_data: RequestMap<Vec<u8>>,
    closed: bool,
}

#[wasm_bindgen]
impl NbdServer {
    /// A server for one client connection. `exports`: `[{name, size,
    /// description?, readOnly?, blockSizes?: {minimum, preferred, maximum},
    /// capabilities?: {flush, fua, trim, writeZeroes, fastZero, cache,
    /// resize, multiConn, blockStatus, rotational}}]`; the first is the
    /// default export. `options`: `{maxInFlight?, listable?}`.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "ExportDescription[]")] exports: JsValue,
        #[wasm_bindgen(unchecked_param_type = "ServerOptions | undefined")] options: JsValue,
    ) -> Result<NbdServer, JsError> {
        let catalog = OwnedCatalog::from_js(&exports, get_bool(&options, "listable", true)?)?;
        let mut config = Config::default();
        if let Some(max) = get_u64(&options, "maxInFlight")? {
            config.max_in_flight = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        }
        Ok(Self {
            conn: Connection::new(catalog, config),
            input: Vec::new(),
            output: Vec::new(),
            reads: RequestMap::new(),
            read_data: RequestMap::new(),
            closed: false,
        })
    }

    /// Appends bytes the client sent and processes them; returns the
    /// events (an array, possibly empty).
    #[wasm_bindgen(unchecked_return_type = "ServerEvent[]")]
    pub fn push(&mut self, data: &[u8]) -> Result<Array, JsError> {
        if !self.closed {
            self.input.extend_from_slice(data);
        }
        self.run()
    }

    /// Processes buffered input again without new bytes; call it after
    /// completions (a flush waiting for writes, or input paused by a full
    /// request table, continue here). Returns the events.
    #[wasm_bindgen(unchecked_return_type = "ServerEvent[]")]
    pub fn poll(&mut self) -> Result<Array, JsError> {
        self.run()
    }

    /// Every byte due to the client: option replies, reply headers, and
    /// the read data given to `completeRead`.
    #[wasm_bindgen(js_name = takeOutput)]
    pub fn take_output(&mut self) -> Result<Vec<u8>, JsError> {
        self.transmit()?;
        Ok(std::mem::take(&mut self.output))
    }

    /// Tells the server the client closed the connection: nothing more is
    /// pushed. Throws when the client had not ended the session
    /// (`NBD_OPT_ABORT`, `NBD_CMD_DISC`), as `NbdClient.end` does for the
    /// other side.
    pub fn end(&mut self) -> Result<(), JsError> {
        self.closed = true;
        self.conn
            .end_of_input()
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Answers a read with its data (exactly the requested length).
    #[wasm_bindgen(js_name = completeRead)]
    pub fn complete_read(&mut self, id: u32, data: Vec<u8>) -> Result<(), JsError> {
        let length = *self
            .reads
            .get(RequestId::from_bits(id))
            .ok_or_else(|| JsError::new(&format!("no read {id} awaits data")))?;
        if data.len() as u64 != length {
            return Err(JsError::new(&format!(
                "read {id} wants {length} bytes, got {}",
                data.len()
            )));
        }
        self.conn
            .complete_read(RequestId::from_bits(id), ReadOutcome::Data)
            .map_err(completion_error)?;
        self.reads.remove(RequestId::from_bits(id));
        self.read_data.insert(RequestId::from_bits(id), data);
        Ok(())
    }

    /// Answers a read whose whole range reads as zeroes (a hole chunk with
    /// structured replies, zero bytes otherwise).
    #[wasm_bindgen(js_name = completeReadZeroes)]
    pub fn complete_read_zeroes(&mut self, id: u32) -> Result<(), JsError> {
        self.conn
            .complete_read(RequestId::from_bits(id), ReadOutcome::Zeroes)
            .map_err(completion_error)?;
        self.reads.remove(RequestId::from_bits(id));
        Ok(())
    }

    /// Answers any request but a successful read or block status: `null`
    /// for success, or an error name (`"EIO"`, `"EPERM"`, `"ENOSPC"`, …).
    /// A write may fail before its data is whole (the rest is dropped); it
    /// succeeds only after the `writeData` event with `remaining == 0`.
    pub fn complete(&mut self, id: u32, error: Option<String>) -> Result<(), JsError> {
        let result = match error {
            None => {
                if self.reads.contains(RequestId::from_bits(id)) {
                    return Err(JsError::new(
                        "a successful read is answered with completeRead or completeReadZeroes",
                    ));
                }
                Ok(())
            }
            Some(name) => Err(parse_error(&name)?),
        };
        self.conn
            .complete(RequestId::from_bits(id), result)
            .map_err(completion_error)?;
        self.reads.remove(RequestId::from_bits(id));
        Ok(())
    }

    /// Answers a block-status request with extents from its offset, in
    /// order: `[{length, status}]` (status bits of `base:allocation`:
    /// 1 hole, 2 zero).
    #[wasm_bindgen(js_name = completeBlockStatus)]
    pub fn complete_block_status(
        &mut self,
        id: u32,
        #[wasm_bindgen(unchecked_param_type = "Extent[]")] extents: JsValue,
    ) -> Result<(), JsError> {
        let extents = extents_from_js(&extents)?;
        self.conn
            .complete_block_status(RequestId::from_bits(id), &extents)
            .map_err(completion_error)
    }

    /// Starts a graceful stop: new requests get `ESHUTDOWN`, and a `close`
    /// event with reason `"shutdown"` comes once nothing is in flight
    /// (call `poll`).
    pub fn shutdown(&mut self) {
        self.conn.shutdown();
    }

    /// Requests the shell has not answered yet.
    #[wasm_bindgen(getter, js_name = inFlight)]
    pub fn in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    /// Whether the session is over (closed cleanly or by an error).
    #[wasm_bindgen(getter, js_name = isClosed)]
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes pushed but not consumed yet.
    #[wasm_bindgen(getter, js_name = bufferedInput)]
    pub fn buffered_input(&self) -> usize {
        self.input.len()
    }

    fn run(&mut self) -> Result<Array, JsError> {
        let events = Array::new();
        while !self.closed {
            self.transmit()?;
            let step = match self.conn.process(&self.input) {
                Ok(step) => step,
                Err(error) => {
                    self.closed = true;
                    let event = Obj::new("error").set("message", error.to_string());
                    events.push(&event.build());
                    break;
                }
            };
            let consumed = step.consumed;
            let event = step
                .event
                .map(|event| event_to_js(&self.conn, &mut self.reads, event));
            self.input.drain(..consumed);
            match event {
                Some((event, close)) => {
                    events.push(&event);
                    self.closed |= close;
                }
                None if self.conn.wants_transmit() => {}
                None => break,
            }
        }
        self.transmit()?;
        Ok(events)
    }

    /// Moves every pending message into the output.
    fn transmit(&mut self) -> Result<(), JsError> {
        while let Some(transmit) = self.conn.poll_transmit() {
            for part in transmit.parts {
                self.output.extend_from_slice(part);
            }
            match transmit.payload {
                None => {}
                Some(Payload::Data { id, length, .. }) => {
                    let data = self.read_data.remove(id);
                    match data {
                        Some(data) if data.len() as u64 == length => {
                            self.output.extend_from_slice(&data);
                        }
                        _ => return Err(JsError::new("internal error: read data missing")),
                    }
                }
                Some(Payload::Zeroes { length }) => {
                    let end = self.output.len() + length as usize;
                    self.output.resize(end, 0);
                }
            }
        }
        Ok(())
    }
}

fn completion_error(error: nbd_core::server::CompletionError) -> JsError {
    JsError::new(&error.to_string())
}

/// The event as a plain object, and whether it ends the session.
fn event_to_js(conn: &Conn, reads: &mut RequestMap<u64>, event: Event<'_>) -> (JsValue, bool) {
    let event = match event {
        Event::ExportSelected {
            index,
            size,
            flags,
            features,
        } => {
            let name = conn
                .catalog()
                .exports
                .get(index)
                .map(|e| e.name.clone())
                .unwrap_or_default();
            Obj::new("exportSelected")
                .set("index", index as u32)
                .set("name", name)
                .num("size", size)
                .set("flags", flags.bits())
                .set("structuredReplies", features.structured_replies)
                .set("extendedHeaders", features.extended_headers)
        }
        Event::StartTls => Obj::new("startTls"),
        Event::Request(request) => request_to_js(reads, request),
        Event::WriteData {
            id,
            offset,
            data,
            remaining,
        } => Obj::new("writeData")
            .set("id", id.to_bits())
            .num("offset", offset)
            .bytes("data", data)
            .num("remaining", remaining),
        Event::Closed(reason) => {
            let reason = match reason {
                CloseReason::Abort => "abort",
                CloseReason::Disconnect => "disconnect",
                CloseReason::Shutdown => "shutdown",
            };
            return (Obj::new("close").set("reason", reason).build(), true);
        }
        _ => Obj::new("unknown"),
    };
    (event.build(), false)
}

fn request_to_js(reads: &mut RequestMap<u64>, request: Request) -> Obj {
    let id = request.id().to_bits();
    match request {
        Request::Read { offset, length, .. } => {
            reads.insert(request.id(), length);
            Obj::new("read").num("offset", offset).num("length", length)
        }
        Request::Write {
            offset,
            length,
            fua,
            ..
        } => Obj::new("write")
            .num("offset", offset)
            .num("length", length)
            .set("fua", fua),
        Request::Flush { .. } => Obj::new("flush"),
        Request::Trim {
            offset,
            length,
            fua,
            ..
        } => Obj::new("trim")
            .num("offset", offset)
            .num("length", length)
            .set("fua", fua),
        Request::Cache { offset, length, .. } => Obj::new("cache")
            .num("offset", offset)
            .num("length", length),
        Request::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
            ..
        } => Obj::new("writeZeroes")
            .num("offset", offset)
            .num("length", length)
            .set("fua", fua)
            .set("noHole", no_hole)
            .set("fastZero", fast),
        Request::BlockStatus {
            offset,
            length,
            req_one,
            ..
        } => Obj::new("blockStatus")
            .num("offset", offset)
            .num("length", length)
            .set("reqOne", req_one),
        Request::Resize { size, .. } => Obj::new("resize").num("size", size),
        _ => Obj::new("unknown"),
    }
    .set("id", id)
}

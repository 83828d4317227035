//! `NbdClient`: the client state machine for JavaScript.

use js_sys::Array;
use nbd_core::client::{
    BASE_ALLOCATION, Config, Connection, Event, ExportInfo, Mode, Payload, RequestId, UsageError,
};
use nbd_core::shape::RequestMap;
use nbd_core::wire::{BlockSizeConstraints, CommandFlags, Info};
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsError, JsValue};

use crate::js::{Obj, array, error_name, extents_to_js, get, get_bool, get_string, number, to_u64};

type Conn = Connection<128, 16384>;

/// One NBD client connection, sans I/O: send what `takeOutput` returns
/// (the client flags and options first), feed the server's bytes to
/// `push`, and act on the events it returns. Once a `ready` event came,
/// `read`, `write`, `flush`, … queue requests and return their ids; each
/// request ends with one `done` event, in any order.
///
/// Input is buffered inside: `push` keeps an incomplete message until the
/// rest arrives. Write payloads are kept until their header is output.
#[wasm_bindgen]
#[derive(Debug)]
pub struct NbdClient {
    conn: Conn,
    input: Vec<u8>,
    output: Vec<u8>,
    writes: RequestMap<Vec<u8>>,
    closed: bool,
}

#[wasm_bindgen]
impl NbdClient {
    /// A client. `options`: `{exportName?: "", mode?: "go" | "info" |
    /// "list", structuredReplies?: true, extendedHeaders?: true,
    /// blockStatus?: true (asks for base:allocation), metaContexts?:
    /// string[], requestName?, requestDescription?, requestBlockSize?: true}`.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "ClientOptions | undefined")] options: JsValue,
    ) -> Result<NbdClient, JsError> {
        let name = get_string(&options, "exportName")?.unwrap_or_default();
        let mut config = Config::new(&name);
        config.mode = match get_string(&options, "mode")?.as_deref() {
            None | Some("go") => Mode::Go,
            Some("info") => Mode::Info,
            Some("list") => Mode::List,
            Some(other) => {
                return Err(JsError::new(&format!(
                    "mode {other:?}: use \"go\", \"info\" or \"list\""
                )));
            }
        };
        config.structured_replies = get_bool(&options, "structuredReplies", true)?;
        config.extended_headers = get_bool(&options, "extendedHeaders", true)?;
        config.request_name = get_bool(&options, "requestName", false)?;
        config.request_description = get_bool(&options, "requestDescription", false)?;
        config.request_block_size = get_bool(&options, "requestBlockSize", true)?;
        let contexts = get(&options, "metaContexts");
        let contexts: Vec<String> = if contexts.is_undefined() || contexts.is_null() {
            if get_bool(&options, "blockStatus", true)? {
                vec![BASE_ALLOCATION.into()]
            } else {
                Vec::new()
            }
        } else {
            array(&contexts, "metaContexts")?
                .iter()
                .map(|c| {
                    c.as_string()
                        .ok_or_else(|| JsError::new("metaContexts must be strings"))
                })
                .collect::<Result<_, _>>()?
        };
        let queries: Vec<&str> = contexts.iter().map(String::as_str).collect();
        config.meta_contexts = &queries;
        let conn = Conn::new(config).map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Self {
            conn,
            input: Vec::new(),
            output: Vec::new(),
            writes: RequestMap::new(),
            closed: false,
        })
    }

    /// Appends bytes the server sent and processes them; returns the
    /// events (an array, possibly empty).
    #[wasm_bindgen(unchecked_return_type = "ClientEvent[]")]
    pub fn push(&mut self, data: &[u8]) -> Result<Array, JsError> {
        if !self.closed {
            self.input.extend_from_slice(data);
        }
        self.run()
    }

    /// Processes without new bytes: after `disconnect`, the `close` event
    /// comes from here once every request is answered.
    #[wasm_bindgen(unchecked_return_type = "ClientEvent[]")]
    pub fn poll(&mut self) -> Result<Array, JsError> {
        self.run()
    }

    /// Every byte due to the server: client flags, options, request
    /// headers and write payloads.
    #[wasm_bindgen(js_name = takeOutput)]
    pub fn take_output(&mut self) -> Vec<u8> {
        self.transmit();
        std::mem::take(&mut self.output)
    }

    /// Tells the client the server closed the connection. Throws when the
    /// session had not ended cleanly.
    pub fn end(&mut self) -> Result<(), JsError> {
        self.closed = true;
        self.conn
            .end_of_input()
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// `NBD_CMD_READ`; data comes as `readData`/`readHole` events, then
    /// `done`. Flags: `df` (one content chunk), `fua`.
    pub fn read(
        &mut self,
        offset: f64,
        length: f64,
        df: Option<bool>,
        fua: Option<bool>,
    ) -> Result<u32, JsError> {
        let flags = CommandFlags::empty()
            .with_if(CommandFlags::DF, df.unwrap_or(false))
            .with_if(CommandFlags::FUA, fua.unwrap_or(false));
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        id(self.conn.read(offset, length, flags))
    }

    /// `NBD_CMD_WRITE` of `data` at `offset` (the data is kept until sent).
    pub fn write(&mut self, offset: f64, data: Vec<u8>, fua: Option<bool>) -> Result<u32, JsError> {
        let offset = to_u64(offset, "offset")?;
        let id = self
            .conn
            .write(offset, data.len() as u64, fua.unwrap_or(false))
            .map_err(usage_error)?;
        self.writes.insert(id, data);
        Ok(id.to_bits())
    }

    /// `NBD_CMD_FLUSH`.
    pub fn flush(&mut self) -> Result<u32, JsError> {
        id(self.conn.flush())
    }

    /// `NBD_CMD_TRIM`.
    pub fn trim(&mut self, offset: f64, length: f64, fua: Option<bool>) -> Result<u32, JsError> {
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        id(self.conn.trim(offset, length, fua.unwrap_or(false)))
    }

    /// `NBD_CMD_CACHE`.
    pub fn cache(&mut self, offset: f64, length: f64) -> Result<u32, JsError> {
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        id(self.conn.cache(offset, length))
    }

    /// `NBD_CMD_WRITE_ZEROES`, with flags `noHole`, `fastZero`, `fua`.
    #[wasm_bindgen(js_name = writeZeroes)]
    pub fn write_zeroes(
        &mut self,
        offset: f64,
        length: f64,
        no_hole: Option<bool>,
        fast_zero: Option<bool>,
        fua: Option<bool>,
    ) -> Result<u32, JsError> {
        let flags = CommandFlags::empty()
            .with_if(CommandFlags::NO_HOLE, no_hole.unwrap_or(false))
            .with_if(CommandFlags::FAST_ZERO, fast_zero.unwrap_or(false))
            .with_if(CommandFlags::FUA, fua.unwrap_or(false));
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        id(self.conn.write_zeroes(offset, length, flags))
    }

    /// `NBD_CMD_BLOCK_STATUS` for every selected metadata context; extents
    /// come as `blockStatus` events.
    #[wasm_bindgen(js_name = blockStatus)]
    pub fn block_status(
        &mut self,
        offset: f64,
        length: f64,
        req_one: Option<bool>,
    ) -> Result<u32, JsError> {
        let (offset, length) = (to_u64(offset, "offset")?, to_u64(length, "length")?);
        id(self
            .conn
            .block_status(offset, length, req_one.unwrap_or(false)))
    }

    /// `NBD_CMD_RESIZE` to `size` bytes.
    pub fn resize(&mut self, size: f64) -> Result<u32, JsError> {
        id(self.conn.resize(to_u64(size, "size")?))
    }

    /// Ends the session gracefully: `NBD_CMD_DISC` once every request is
    /// answered, then a `close` event (from `push` or `poll`).
    pub fn disconnect(&mut self) -> Result<(), JsError> {
        self.conn.disconnect().map_err(usage_error)
    }

    /// Ends the session as soon as the protocol allows.
    pub fn abort(&mut self) -> Result<(), JsError> {
        self.conn.abort().map_err(usage_error)
    }

    /// The export as negotiated (the `export` event's object), or `null`.
    #[wasm_bindgen(getter, unchecked_return_type = "ExportInfo | null")]
    pub fn export(&self) -> JsValue {
        self.conn
            .export()
            .map_or(JsValue::NULL, |info| export_to_js(Obj::plain(), &info))
    }

    /// Whether commands may be issued.
    #[wasm_bindgen(getter, js_name = isReady)]
    pub fn is_ready(&self) -> bool {
        self.conn.is_ready()
    }

    /// Whether the session is over.
    #[wasm_bindgen(getter, js_name = isClosed)]
    pub fn is_closed(&self) -> bool {
        self.closed || self.conn.is_closed()
    }

    /// Requests not done yet.
    #[wasm_bindgen(getter, js_name = inFlight)]
    pub fn in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    fn run(&mut self) -> Result<Array, JsError> {
        let events = Array::new();
        while !self.closed {
            self.transmit();
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
            let event = step.event.map(event_to_js);
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
        self.transmit();
        Ok(events)
    }

    fn transmit(&mut self) {
        while let Some(transmit) = self.conn.poll_transmit() {
            for part in transmit.parts {
                self.output.extend_from_slice(part);
            }
            if let Some(Payload::Data { id, .. }) = transmit.payload {
                // The core hands out each write's payload once, whole.
                if let Some(data) = self.writes.remove(id) {
                    self.output.extend_from_slice(&data);
                }
            }
        }
    }
}

fn id(result: Result<RequestId, UsageError>) -> Result<u32, JsError> {
    result.map(RequestId::to_bits).map_err(usage_error)
}

fn usage_error(error: UsageError) -> JsError {
    JsError::new(&error.to_string())
}

fn block_sizes_to_js(sizes: BlockSizeConstraints) -> JsValue {
    Obj::plain()
        .set("minimum", sizes.minimum)
        .set("preferred", sizes.preferred)
        .set("maximum", sizes.maximum)
        .build()
}

fn export_to_js(obj: Obj, info: &ExportInfo) -> JsValue {
    obj.num("size", info.size)
        .set("flags", info.flags.bits())
        .set("readOnly", info.is_read_only())
        .set("canFlush", info.can_flush())
        .set("canFua", info.can_fua())
        .set("canTrim", info.can_trim())
        .set("canWriteZeroes", info.can_write_zeroes())
        .set("canFastZero", info.can_fast_zero())
        .set("canCache", info.can_cache())
        .set("canResize", info.can_resize())
        .set("canDf", info.can_df())
        .set("canMultiConn", info.can_multi_conn())
        .set("rotational", info.is_rotational())
        .set("blockSizes", block_sizes_to_js(info.block_sizes))
        .set("blockSizesAdvertised", info.block_sizes_advertised)
        .set("structuredReplies", info.features.structured_replies)
        .set("extendedHeaders", info.features.extended_headers)
        .build()
}

/// The event as a plain object, and whether it ends the session.
fn event_to_js(event: Event<'_>) -> (JsValue, bool) {
    let event = match event {
        Event::Greeted { flags } => Obj::new("greeted").set("flags", flags.bits()),
        Event::StartTls => Obj::new("tlsStart"),
        Event::ListEntry { name, description } => Obj::new("listEntry")
            .text("name", name)
            .text("description", description),
        Event::MetaContext { id, name } => Obj::new("metaContext")
            .set("contextId", id)
            .text("name", name),
        Event::Info(info) => info_to_js(&info),
        Event::Export(info) => return (export_to_js(Obj::new("export"), &info), false),
        Event::Ready => Obj::new("ready"),
        Event::OptionRefused {
            option,
            reply_type,
            message,
        } => Obj::new("optionRefused")
            .set("option", format!("{option:?}"))
            .set("replyType", format!("{reply_type:?}"))
            .text("message", message),
        Event::ReadData { id, offset, data } => Obj::new("readData")
            .set("id", id.to_bits())
            .num("offset", offset)
            .bytes("data", data),
        Event::ReadHole { id, offset, length } => Obj::new("readHole")
            .set("id", id.to_bits())
            .num("offset", offset)
            .num("length", length),
        Event::BlockStatus {
            id,
            context_id,
            offset,
            descriptors,
        } => Obj::new("blockStatus")
            .set("id", id.to_bits())
            .set("contextId", context_id)
            .num("offset", offset)
            .set("extents", extents_to_js(descriptors.iter())),
        Event::Done { id, result } => Obj::new("done").set("id", id.to_bits()).set(
            "error",
            result
                .err()
                .map_or(JsValue::NULL, |e| JsValue::from_str(error_name(e))),
        ),
        Event::Closed => return (Obj::new("close").build(), true),
        _ => Obj::new("unknown"),
    };
    (event.build(), false)
}

fn info_to_js(info: &Info<'_>) -> Obj {
    let obj = Obj::new("info");
    match *info {
        Info::Export { size, flags } => obj
            .set("infoType", "export")
            .set("size", number(size))
            .set("flags", flags.bits()),
        Info::Name(name) => obj.set("infoType", "name").text("name", name),
        Info::Description(text) => obj.set("infoType", "description").text("description", text),
        Info::BlockSize(sizes) => obj
            .set("infoType", "blockSize")
            .set("blockSizes", block_sizes_to_js(sizes)),
        Info::Unknown { info_type, data } => obj
            .set("infoType", "unknown")
            .set("code", info_type)
            .bytes("data", data),
    }
}

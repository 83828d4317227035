//! Small helpers between Rust values and plain JavaScript objects.

use js_sys::{Array, Object, Reflect, Uint8Array};
use nbd_core::wire::{ErrorCode, ExtDescriptor};
use wasm_bindgen::{JsError, JsValue};

/// Largest integer a JavaScript number holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A plain object `{type: kind, ...}` under construction.
pub(crate) struct Obj(Object);

impl Obj {
    pub(crate) fn new(kind: &str) -> Self {
        let obj = Self(Object::new());
        obj.set("type", kind)
    }

    pub(crate) fn plain() -> Self {
        Self(Object::new())
    }

    pub(crate) fn set(self, key: &str, value: impl Into<JsValue>) -> Self {
        // Setting a data property on a fresh plain object cannot fail.
        let _ = Reflect::set(&self.0, &JsValue::from_str(key), &value.into());
        self
    }

    pub(crate) fn num(self, key: &str, value: u64) -> Self {
        self.set(key, number(value))
    }

    pub(crate) fn bytes(self, key: &str, data: &[u8]) -> Self {
        self.set(key, Uint8Array::from(data))
    }

    pub(crate) fn text(self, key: &str, data: &[u8]) -> Self {
        self.set(key, JsValue::from_str(&String::from_utf8_lossy(data)))
    }

    pub(crate) fn build(self) -> JsValue {
        self.0.into()
    }
}

/// A 64-bit count as a JavaScript number (exact up to 2^53).
pub(crate) fn number(value: u64) -> JsValue {
    JsValue::from_f64(value as f64)
}

/// A JavaScript number that must be a non-negative safe integer.
pub(crate) fn to_u64(value: f64, what: &str) -> Result<u64, JsError> {
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= MAX_SAFE_INTEGER {
        Ok(value as u64)
    } else {
        Err(JsError::new(&format!(
            "{what} must be a non-negative integer (at most 2^53 - 1)"
        )))
    }
}

/// Reads property `key` of `obj` (undefined when `obj` is not an object).
pub(crate) fn get(obj: &JsValue, key: &str) -> JsValue {
    if !obj.is_object() {
        return JsValue::UNDEFINED;
    }
    Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

pub(crate) fn get_bool(obj: &JsValue, key: &str, default: bool) -> Result<bool, JsError> {
    let value = get(obj, key);
    if value.is_undefined() || value.is_null() {
        return Ok(default);
    }
    value
        .as_bool()
        .ok_or_else(|| JsError::new(&format!("{key} must be a boolean")))
}

pub(crate) fn get_u64(obj: &JsValue, key: &str) -> Result<Option<u64>, JsError> {
    let value = get(obj, key);
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    if let Some(n) = value.as_f64() {
        return to_u64(n, key).map(Some);
    }
    if value.is_bigint() {
        let text: String = js_sys::BigInt::from(value)
            .to_string(10)
            .map(String::from)
            .unwrap_or_default();
        return text
            .parse()
            .map(Some)
            .map_err(|_| JsError::new(&format!("{key} must be a non-negative 64-bit integer")));
    }
    Err(JsError::new(&format!("{key} must be a number")))
}

pub(crate) fn get_string(obj: &JsValue, key: &str) -> Result<Option<String>, JsError> {
    let value = get(obj, key);
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    value
        .as_string()
        .map(Some)
        .ok_or_else(|| JsError::new(&format!("{key} must be a string")))
}

/// The elements of a JavaScript array.
pub(crate) fn array(value: &JsValue, what: &str) -> Result<Vec<JsValue>, JsError> {
    if !Array::is_array(value) {
        return Err(JsError::new(&format!("{what} must be an array")));
    }
    Ok(Array::from(value).iter().collect())
}

/// Error names as used in events and completions: `"EIO"` etc.
const ERRORS: [(&str, ErrorCode); 8] = [
    ("EPERM", ErrorCode::Perm),
    ("EIO", ErrorCode::Io),
    ("ENOMEM", ErrorCode::NoMemory),
    ("EINVAL", ErrorCode::Invalid),
    ("ENOSPC", ErrorCode::NoSpace),
    ("EOVERFLOW", ErrorCode::Overflow),
    ("ENOTSUP", ErrorCode::NotSupported),
    ("ESHUTDOWN", ErrorCode::Shutdown),
];

/// `"EIO"` for [`ErrorCode::Io`].
pub(crate) fn error_name(code: ErrorCode) -> &'static str {
    ERRORS
        .iter()
        .find(|(_, c)| *c == code)
        .map_or("EINVAL", |(name, _)| name)
}

/// An error code from its name: `"EIO"` or `"NBD_EIO"` (any case).
pub(crate) fn parse_error(name: &str) -> Result<ErrorCode, JsError> {
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("NBD_").unwrap_or(&upper);
    ERRORS
        .iter()
        .find(|(n, _)| *n == short)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            JsError::new(&format!(
                "unknown NBD error {name:?}: use EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP or ESHUTDOWN"
            ))
        })
}

/// `[{length, status}, ...]` as JavaScript objects.
pub(crate) fn extents_to_js(extents: impl Iterator<Item = ExtDescriptor>) -> Array {
    extents
        .map(|e| {
            Obj::plain()
                .num("length", e.length)
                .num("status", e.status)
                .build()
        })
        .collect()
}

/// `[{length, status}, ...]` from JavaScript (status defaults to 0).
pub(crate) fn extents_from_js(value: &JsValue) -> Result<Vec<ExtDescriptor>, JsError> {
    array(value, "extents")?
        .iter()
        .map(|item| {
            Ok(ExtDescriptor {
                length: get_u64(item, "length")?
                    .ok_or_else(|| JsError::new("extent without length"))?,
                status: get_u64(item, "status")?.unwrap_or(0),
            })
        })
        .collect()
}

// Reads the option requests a client sends during negotiation, so a page
// can show them (the server state machine reports only the outcome).
// NBD spec, "Option haggling": after 4 bytes of client flags, each option
// is IHAVEOPT (8 bytes), the option code (u32), its length (u32), its data.

const IHAVEOPT = [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54];

/** NBD_OPT_* codes by number. */
export const OPTION_NAMES = {
  1: "EXPORT_NAME", 2: "ABORT", 3: "LIST", 4: "PEEK_EXPORT", 5: "STARTTLS", 6: "INFO", 7: "GO",
  8: "STRUCTURED_REPLY", 9: "LIST_META_CONTEXT", 10: "SET_META_CONTEXT", 11: "EXTENDED_HEADERS",
};

/** NBD_INFO_* codes by number. */
const INFO_NAMES = { 0: "EXPORT", 1: "NAME", 2: "DESCRIPTION", 3: "BLOCK_SIZE" };

/** Most option bytes kept while waiting for the rest of an option. */
const MAX_BUFFERED = 64 * 1024;

const text = (bytes) => new TextDecoder().decode(bytes);

/** What one option asks, for people: `{code, name, detail}`. */
export function describeOption(code, data) {
  const name = OPTION_NAMES[code] ?? `option ${code}`;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let detail = "";
  try {
    if (code === 1) {
      detail = JSON.stringify(text(data));
    } else if ((code === 6 || code === 7) && data.length >= 6) {
      const nameLength = view.getUint32(0);
      const count = view.getUint16(4 + nameLength);
      const infos = [];
      for (let i = 0; i < count; i++) {
        const info = view.getUint16(6 + nameLength + 2 * i);
        infos.push(INFO_NAMES[info] ?? String(info));
      }
      detail = `export ${JSON.stringify(text(data.subarray(4, 4 + nameLength)))}`;
      if (infos.length) detail += `, info ${infos.join(" ")}`;
    } else if ((code === 9 || code === 10) && data.length >= 8) {
      const nameLength = view.getUint32(0);
      let at = 4 + nameLength;
      const count = view.getUint32(at);
      at += 4;
      const queries = [];
      for (let i = 0; i < count && at + 4 <= data.length; i++) {
        const length = view.getUint32(at);
        queries.push(text(data.subarray(at + 4, at + 4 + length)));
        at += 4 + length;
      }
      detail = queries.join(", ") || "(all)";
    }
  } catch {
    detail = `${data.length} bytes (malformed)`;
  }
  return { code, name, detail };
}

/**
 * Feed it the client's bytes from the first; it returns the options that
 * became complete. Stops at GO or EXPORT_NAME (transmission may follow);
 * call `resume()` if the server refused it and negotiation goes on.
 */
export class OptionReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.flagsSeen = false;
    this.stopped = false;
    this.clientFlags = null;
    /** Stopped at GO, EXPORT_NAME or ABORT (not at garbage). */
    this.atEnd = false;
  }

  push(bytes) {
    if (this.stopped) return [];
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer);
    joined.set(bytes, this.buffer.length);
    const options = [];
    let at = 0;
    if (!this.flagsSeen && joined.length >= 4) {
      this.clientFlags = new DataView(joined.buffer).getUint32(0);
      this.flagsSeen = true;
      at = 4;
    }
    while (this.flagsSeen && !this.stopped && joined.length - at >= 16) {
      if (!IHAVEOPT.every((b, i) => joined[at + i] === b)) {
        this.stopped = true; // not an option: the reader has nothing more to say
        break;
      }
      const view = new DataView(joined.buffer, at + 8, 8);
      const code = view.getUint32(0);
      const length = view.getUint32(4);
      if (joined.length - at - 16 < length) {
        if (length > MAX_BUFFERED) this.stopped = true;
        break;
      }
      options.push(describeOption(code, joined.subarray(at + 16, at + 16 + length)));
      at += 16 + length;
      if (code === 1 || code === 7 || code === 2) this.stopped = this.atEnd = true;
    }
    this.buffer = this.stopped ? new Uint8Array(0) : joined.slice(at);
    return options;
  }

  resume() {
    if (this.atEnd) this.stopped = this.atEnd = false;
  }

  /** Negotiation is over (an export was selected): read nothing more. */
  finish() {
    this.stopped = true;
    this.atEnd = false;
    this.buffer = new Uint8Array(0);
  }
}

// The Worker behind OpfsDisk: holds a FileSystemSyncAccessHandle (only
// workers may) and answers {id, op, ...} messages one at a time.
let handle = null;

const ZERO_CHUNK = 1024 * 1024;

async function open(name, size) {
  const root = await navigator.storage.getDirectory();
  const file = await root.getFileHandle(name, { create: true });
  handle = await file.createSyncAccessHandle();
  if (size !== undefined && handle.getSize() !== size) handle.truncate(size);
  return handle.getSize();
}

function readAt(offset, length) {
  const data = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = handle.read(data.subarray(done), { at: offset + done });
    if (n === 0) break; // past the end: the rest stays zero
    done += n;
  }
  return data;
}

function writeAt(offset, data) {
  let done = 0;
  while (done < data.length) {
    const n = handle.write(data.subarray(done), { at: offset + done });
    if (n <= 0) throw new Error("write made no progress (disk full?)");
    done += n;
  }
}

function zeroAt(offset, length) {
  const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
  for (let at = 0; at < length; at += zeroes.length) {
    writeAt(offset + at, zeroes.subarray(0, Math.min(zeroes.length, length - at)));
  }
}

self.onmessage = async ({ data: message }) => {
  const { id, op } = message;
  try {
    if (op !== "open" && !handle) throw new Error("the OPFS file is not open");
    let data;
    const transfer = [];
    switch (op) {
      case "open":
        data = await open(message.name, message.size);
        break;
      case "read":
        data = readAt(message.offset, message.length).buffer;
        transfer.push(data);
        break;
      case "write":
        writeAt(message.offset, message.data);
        break;
      case "zero":
        zeroAt(message.offset, message.length);
        break;
      case "flush":
        handle.flush();
        break;
      case "close":
        handle?.flush();
        handle?.close();
        handle = null;
        break;
      default:
        throw new Error(`unknown operation ${op}`);
    }
    self.postMessage({ id, data }, transfer);
  } catch (error) {
    const nbdError = error?.name === "QuotaExceededError" ? "ENOSPC" : "EIO";
    self.postMessage({ id, error: String(error?.message ?? error), nbdError });
  }
};

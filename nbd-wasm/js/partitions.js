// MBR and GPT partition tables, read through any `read(offset, length)`
// (an NbdConnection, a disk). Pure parsing; nothing is written.

/** MBR partition type names (the common ones). */
export const MBR_TYPES = {
  0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "NTFS/exFAT/HPFS",
  0x0b: "W95 FAT32", 0x0c: "W95 FAT32 (LBA)", 0x0e: "W95 FAT16 (LBA)", 0x0f: "W95 Extended (LBA)",
  0x11: "Hidden FAT12", 0x82: "Linux swap", 0x83: "Linux", 0x85: "Linux extended", 0x8e: "Linux LVM",
  0xa5: "FreeBSD", 0xa6: "OpenBSD", 0xa8: "Darwin UFS", 0xaf: "HFS/HFS+", 0xee: "GPT protective",
  0xef: "EFI (FAT-12/16/32)", 0xfd: "Linux raid autodetect",
};

/** GPT partition type GUIDs (the common ones). */
export const GPT_TYPES = {
  "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
  "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
  "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
  "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
  "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
  "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
  "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
  "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
  "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
  "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
  "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
  "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
  "48465300-0000-11aa-aa11-00306543ecac": "Apple HFS+",
  "7c3457ef-0000-11aa-aa11-00306543ecac": "Apple APFS",
};

/** Most logical partitions followed in an extended partition's chain. */
const MAX_LOGICAL = 128;
/** Most GPT entries read (the usual table holds 128). */
const MAX_GPT_ENTRIES = 1024;

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

/** A GPT GUID as text (the first three fields are little-endian). */
export function guidText(bytes) {
  const le = (a, b) => hex(bytes.subarray(a, b).slice().reverse());
  return `${le(0, 4)}-${le(4, 6)}-${le(6, 8)}-${hex(bytes.subarray(8, 10))}-${hex(bytes.subarray(10, 16))}`;
}

function mbrEntries(sector) {
  const view = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  const entries = [];
  for (let i = 0; i < 4; i++) {
    const at = 446 + 16 * i;
    const type = sector[at + 4];
    const start = view.getUint32(at + 8, true);
    const sectors = view.getUint32(at + 12, true);
    if (type === 0 || sectors === 0) continue;
    entries.push({ slot: i, bootable: sector[at] === 0x80, type, start, sectors });
  }
  return entries;
}

const hasBootSignature = (sector) => sector.length >= 512 && sector[510] === 0x55 && sector[511] === 0xaa;
const isExtended = (type) => type === 0x05 || type === 0x0f || type === 0x85;

/**
 * Reads the partition table of a disk. `read(offset, length)` returns (a
 * promise of) bytes; `size` is the disk's size in bytes. Resolves to
 * `{scheme: "gpt" | "mbr" | null, diskId?, partitions: [{number, start,
 * end, sectors, size, type, typeName, name?, bootable?, guid?}],
 * warnings: string[]}` with sector numbers (LBA) of `sectorSize` bytes.
 */
export async function readPartitionTable(read, size, sectorSize = 512) {
  const warnings = [];
  const result = { scheme: null, partitions: [], warnings, sectorSize };
  if (size < sectorSize * 2) return result;
  const mbr = await read(0, sectorSize);
  if (!hasBootSignature(mbr)) return result;
  const primaries = mbrEntries(mbr);
  if (primaries.some((p) => p.type === 0xee)) {
    const gpt = await readGpt(read, size, sectorSize, warnings);
    if (gpt) return { ...result, ...gpt };
    warnings.push("protective MBR without a valid GPT header");
  }
  result.scheme = "mbr";
  result.diskId = new DataView(mbr.buffer, mbr.byteOffset).getUint32(440, true).toString(16).padStart(8, "0");
  const describe = (entry, number, base = 0) => ({
    number,
    start: base + entry.start,
    end: base + entry.start + entry.sectors - 1,
    sectors: entry.sectors,
    size: entry.sectors * sectorSize,
    type: `0x${entry.type.toString(16).padStart(2, "0")}`,
    typeName: MBR_TYPES[entry.type] ?? "unknown",
    bootable: entry.bootable,
  });
  for (const entry of primaries) result.partitions.push(describe(entry, entry.slot + 1));
  const extended = primaries.find((p) => isExtended(p.type));
  if (extended) {
    // Logical partitions: a chain of EBRs, each relative to the extended partition's start.
    let ebr = extended.start;
    for (let number = 5; number < 5 + MAX_LOGICAL && ebr; number++) {
      if ((ebr + 1) * sectorSize > size) {
        warnings.push(`EBR at sector ${ebr} is past the end of the disk`);
        break;
      }
      const sector = await read(ebr * sectorSize, sectorSize);
      if (!hasBootSignature(sector)) {
        warnings.push(`EBR at sector ${ebr} has no 55AA signature`);
        break;
      }
      const [logical, next] = mbrEntries(sector);
      if (logical) result.partitions.push(describe(logical, number, ebr));
      ebr = next && isExtended(next.type) ? extended.start + next.start : 0;
    }
  }
  for (const p of result.partitions) {
    if ((p.end + 1) * sectorSize > size) warnings.push(`partition ${p.number} ends past the end of the disk`);
  }
  return result;
}

async function readGpt(read, size, sectorSize, warnings) {
  const header = await read(sectorSize, sectorSize);
  if (new TextDecoder().decode(header.subarray(0, 8)) !== "EFI PART") return null;
  const diskId = guidText(header.subarray(56, 72));
  const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
  const entriesLba = Number(view.getBigUint64(72, true));
  const count = view.getUint32(80, true);
  const entrySize = view.getUint32(84, true);
  if (entrySize < 128 || entrySize > 4096 || count === 0) {
    warnings.push(`GPT entries of ${entrySize} bytes, ${count} of them: not read`);
    return { scheme: "gpt", diskId, partitions: [] };
  }
  const shown = Math.min(count, MAX_GPT_ENTRIES);
  if (shown < count) warnings.push(`GPT has ${count} entries; the first ${shown} are read`);
  const bytes = shown * entrySize;
  if (entriesLba * sectorSize + bytes > size) {
    warnings.push("GPT entry array is past the end of the disk");
    return { scheme: "gpt", diskId, partitions: [] };
  }
  const table = await read(entriesLba * sectorSize, bytes);
  const partitions = [];
  for (let i = 0; i < shown; i++) {
    const entry = table.subarray(i * entrySize, (i + 1) * entrySize);
    if (entry.subarray(0, 16).every((b) => b === 0)) continue;
    const ev = new DataView(entry.buffer, entry.byteOffset, entry.byteLength);
    const start = Number(ev.getBigUint64(32, true));
    const end = Number(ev.getBigUint64(40, true));
    const type = guidText(entry.subarray(0, 16));
    let name = "";
    for (let c = 56; c + 1 < 128; c += 2) {
      const unit = ev.getUint16(c, true);
      if (unit === 0) break;
      name += String.fromCharCode(unit);
    }
    partitions.push({
      number: i + 1, start, end, sectors: end - start + 1, size: (end - start + 1) * sectorSize,
      type, typeName: GPT_TYPES[type] ?? "unknown", name, guid: guidText(entry.subarray(16, 32)),
    });
  }
  return { scheme: "gpt", diskId, partitions };
}

// An in-memory stand-in for `nbd-std bridge` and its WebSockets, for the
// JS layer's Node tests: provider sockets (serveDisk) send their greeting
// at once and wait; each client socket (NbdConnection) is paired with the
// oldest idle provider, gets its buffered bytes, then both relay. Every
// delivery is asynchronous, as over a network.

const later = (work) => setTimeout(work, 0);

class FakeSocket {
  constructor() {
    this.readyState = 0;
    this.binaryType = "blob";
    this.peer = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.sent = 0;
  }

  deliver(bytes) {
    later(() => {
      if (this.readyState === 1) this.onmessage?.({ data: bytes.buffer });
    });
  }

  open() {
    later(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
    });
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    const bytes = Uint8Array.from(data); // a copy, as a network would make
    this.sent += bytes.length;
    this.largestMessage = Math.max(this.largestMessage ?? 0, bytes.length);
    this.transmit(bytes);
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    later(() => {
      this.readyState = 3;
      this.onclose?.({ code, reason });
      this.peer?.close(code, "peer closed");
    });
  }
}

export class MemoryBridge {
  constructor() {
    this.idle = [];
    this.pairs = 0;
    this.refused = 0;
    const bridge = this;
    this.Provider = class extends FakeSocket {
      constructor(url, protocols) {
        super();
        this.url = url;
        this.protocols = protocols;
        this.buffered = [];
        bridge.idle.push(this);
        this.open();
      }

      transmit(bytes) {
        if (this.peer) this.peer.deliver(bytes);
        else this.buffered.push(bytes);
      }

      close(code, reason) {
        bridge.idle = bridge.idle.filter((p) => p !== this);
        super.close(code, reason);
      }
    };
    this.Client = class extends FakeSocket {
      constructor(url, protocols) {
        super();
        this.url = url;
        const provider = bridge.idle.shift();
        if (!provider) {
          bridge.refused++;
          this.readyState = 1;
          this.close(1011, "no browser session available");
          return;
        }
        bridge.pairs++;
        this.peer = provider;
        provider.peer = this;
        this.open();
        later(() => {
          for (const bytes of provider.buffered) this.deliver(bytes);
          provider.buffered = [];
        });
      }

      transmit(bytes) {
        this.peer.deliver(bytes);
      }
    };
  }
}

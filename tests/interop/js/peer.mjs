// A js-libp2p peer for meshmerge interop tests, controlled over stdin/stdout.
//
// Start: node peer.mjs '<json config>'   (config keys below, all optional)
//   listen:     multiaddrs to listen on          (default ["/ip4/127.0.0.1/tcp/0"])
//   dht:        run kad-dht in server mode       (default true)
//   gossipsub:  options passed to gossipsub()    (merged over the defaults below)
// Protocol: one JSON object per line.
//   stdout, first line: {"event":"ready","peerId":..,"addrs":[..],"protocols":[..]}
//   stdin:  {"id":N,"op":"<name>",...args}
//   stdout: {"id":N,"ok":true,"result":..} or {"id":N,"ok":false,"error":".."}
//   stdout: {"event":"message","topic":..,"data":b64,"from":..,"seqno":hex,"monoNs":".."}
// Bytes travel as base64. monoNs is CLOCK_MONOTONIC in ns (same clock as Python's
// time.monotonic_ns on Linux) so the driver can compute delivery latency.
// stdin EOF or {"op":"stop"} stops the node and exits. Logs go to stderr.
//
// DHT records under /meshmerge/ are accepted by a test validator (non-empty value,
// at most 64 KiB); the selector picks the bytewise greatest value. Seen in js:
// validators run on records received from remotes, not on a local put, and the
// selector only chooses among records one query finds; a PUT_VALUE from a
// remote replaces the stored record without consulting it.

import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { gossipsub } from '@libp2p/gossipsub'
import { identify } from '@libp2p/identify'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { peerIdFromString } from '@libp2p/peer-id'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { CID } from 'multiformats/cid'
import readline from 'node:readline'

const config = JSON.parse(process.argv[2] ?? '{}')
const MAX_RECORD = 64 * 1024

const log = (...args) => process.stderr.write(`[js-peer] ${args.join(' ')}\n`)
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const b64 = (bytes) => Buffer.from(bytes).toString('base64')
const unb64 = (s) => new Uint8Array(Buffer.from(s, 'base64'))
const monoNs = () => process.hrtime.bigint().toString()

function compareBytes (a, b) {
  const n = Math.min(a.length, b.length)
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) return a[i] - b[i]
  }
  return a.length - b.length
}

const meshmergeValidator = async (key, value) => {
  if (value.length === 0) throw new Error('empty /meshmerge/ record')
  if (value.length > MAX_RECORD) throw new Error(`/meshmerge/ record over ${MAX_RECORD} bytes`)
}
const meshmergeSelector = (key, records) => {
  let best = 0
  for (let i = 1; i < records.length; i++) {
    if (compareBytes(records[i], records[best]) > 0) best = i
  }
  return best
}

const services = {
  identify: identify(),
  ping: ping({ maxOutboundStreams: 64, maxInboundStreams: 64 }),
  pubsub: gossipsub({
    emitSelf: false,
    allowPublishToZeroTopicPeers: true,
    ...(config.gossipsub ?? {})
  })
}
if (config.dht !== false) {
  services.dht = kadDHT({
    protocol: '/ipfs/kad/1.0.0',
    clientMode: false,
    peerInfoMapper: passthroughMapper,
    validators: { meshmerge: meshmergeValidator },
    selectors: { meshmerge: meshmergeSelector }
  })
}

const node = await createLibp2p({
  addresses: { listen: config.listen ?? ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services
})

node.services.pubsub.addEventListener('message', (evt) => {
  const msg = evt.detail
  emit({
    event: 'message',
    monoNs: monoNs(),
    topic: msg.topic,
    data: b64(msg.data),
    from: msg.type === 'signed' ? msg.from.toString() : null,
    seqno: msg.type === 'signed' ? msg.sequenceNumber.toString(16) : null
  })
})

// Argument checks, so a bad request gets an error reply rather than odd behaviour.
function str (args, name) {
  const v = args[name]
  if (typeof v !== 'string' || v === '') throw new TypeError(`argument ${name} must be a non-empty string`)
  return v
}
function bytes (args, name) {
  const v = args[name]
  if (typeof v !== 'string') throw new TypeError(`argument ${name} must be base64 text`)
  return unb64(v)
}
const target = (args) => args.addr != null ? multiaddr(str(args, 'addr')) : peerIdFromString(str(args, 'peer'))
const peerOut = (p) => ({ peer: p.id.toString(), addrs: p.multiaddrs.map(String) })
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const withTimeout = (ms) => ({ signal: AbortSignal.timeout(ms ?? 30000) })

function info () {
  return {
    peerId: node.peerId.toString(),
    addrs: node.getMultiaddrs().map(String),
    protocols: node.getProtocols()
  }
}

const ops = {
  info,

  async dial (args) {
    const t0 = performance.now()
    const conn = await node.dial(target(args), withTimeout(args.timeoutMs))
    return { ms: performance.now() - t0, peer: conn.remotePeer.toString(), addr: conn.remoteAddr.toString() }
  },

  async hangUp (args) {
    await node.hangUp(target(args))
    return null
  },

  connections () {
    return node.getConnections().map((c) => ({
      peer: c.remotePeer.toString(), addr: c.remoteAddr.toString(), direction: c.direction
    }))
  },

  async ping (args) {
    const rtts = []
    for (let i = 0; i < (args.count ?? 1); i++) {
      const t0 = performance.now()
      await node.services.ping.ping(target(args), withTimeout(args.timeoutMs))
      rtts.push(performance.now() - t0)
    }
    return rtts
  },

  // What identify (run by js on connect) learned about a remote peer.
  async peerInfo (args) {
    const deadline = Date.now() + (args.timeoutMs ?? 10000)
    const id = peerIdFromString(str(args, 'peer'))
    for (;;) {
      let peer = null
      try { peer = await node.peerStore.get(id) } catch {}
      if (peer != null && peer.protocols.length > 0) {
        const agent = peer.metadata.get('AgentVersion')
        return {
          protocols: peer.protocols,
          agentVersion: agent != null ? new TextDecoder().decode(agent) : null,
          addrs: peer.addresses.map((a) => a.multiaddr.toString())
        }
      }
      if (Date.now() > deadline) throw new Error(`no identify data for ${args.peer}`)
      await sleep(20)
    }
  },

  async dhtPut (args) {
    await node.contentRouting.put(bytes(args, 'key'), bytes(args, 'value'), withTimeout(args.timeoutMs))
    return null
  },

  // Retries until the deadline: a js get was seen to find nothing for 9-19 s
  // although the record was available.
  async dhtGet (args) {
    const deadline = Date.now() + (args.timeoutMs ?? 30000)
    let lastError = null
    while (Date.now() < deadline) {
      try {
        const value = await node.contentRouting.get(bytes(args, 'key'), { signal: AbortSignal.timeout(Math.max(100, deadline - Date.now())) })
        return b64(value)
      } catch (err) {
        lastError = err
        await sleep(100)
      }
    }
    throw new Error(`dhtGet found nothing before the deadline: ${lastError}`)
  },

  async dhtProvide (args) {
    await node.contentRouting.provide(CID.decode(bytes(args, 'cid')), withTimeout(args.timeoutMs))
    return null
  },

  async dhtFindProviders (args) {
    const out = []
    const opts = withTimeout(args.timeoutMs)
    try {
      for await (const p of node.contentRouting.findProviders(CID.decode(bytes(args, 'cid')), opts)) {
        out.push(peerOut(p))
        if (out.length >= (args.count ?? 20)) break
      }
    } catch (err) {
      if (out.length === 0) throw err
    }
    return out
  },

  async dhtFindPeer (args) {
    return peerOut(await node.peerRouting.findPeer(peerIdFromString(str(args, 'peer')), withTimeout(args.timeoutMs)))
  },

  routingTable () {
    const rt = node.services.dht.routingTable
    return { size: rt.size }
  },

  subscribe (args) {
    node.services.pubsub.subscribe(str(args, 'topic'))
    return null
  },

  unsubscribe (args) {
    node.services.pubsub.unsubscribe(str(args, 'topic'))
    return null
  },

  async publish (args) {
    const res = await node.services.pubsub.publish(str(args, 'topic'), bytes(args, 'data'))
    return { recipients: res.recipients.map(String) }
  },

  topicPeers (args) {
    return node.services.pubsub.getSubscribers(str(args, 'topic')).map(String)
  },

  meshPeers (args) {
    return node.services.pubsub.getMeshPeers(str(args, 'topic'))
  },

  score (args) {
    return node.services.pubsub.getScore(str(args, 'peer'))
  },

  // Per-peer score components (topic counters, behaviour penalty, IP colocation).
  scoreStats () {
    return JSON.parse(JSON.stringify(node.services.pubsub.dumpPeerScoreStats(), (key, value) =>
      value instanceof Map ? Object.fromEntries(value) : (typeof value === 'bigint' ? value.toString() : value)))
  },

  async dhtClosestPeers (args) {
    const out = []
    for await (const event of node.services.dht.getClosestPeers(bytes(args, 'key'), withTimeout(args.timeoutMs))) {
      if (event.name === 'FINAL_PEER') out.push(peerOut(event.peer))
    }
    return out
  }
}

let stopping = false
async function stop (code) {
  if (stopping) return
  stopping = true
  try { await node.stop() } catch (err) { log('stop failed:', err) }
  process.exit(code)
}

async function handle (line) {
  let req
  try {
    req = JSON.parse(line)
  } catch (err) {
    emit({ id: null, ok: false, error: `bad JSON: ${err.message}` })
    return
  }
  if (req.op === 'stop') {
    emit({ id: req.id, ok: true, result: null })
    await stop(0)
    return
  }
  const fn = ops[req.op]
  if (fn == null) {
    emit({ id: req.id, ok: false, error: `unknown op ${req.op}` })
    return
  }
  try {
    const result = await fn(req)
    emit({ id: req.id, ok: true, result: result ?? null })
  } catch (err) {
    emit({ id: req.id, ok: false, error: `${err.name ?? 'Error'}: ${err.message ?? err}` })
  }
}

process.on('SIGTERM', () => { stop(0) })
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => { if (line.trim() !== '') handle(line) })
rl.on('close', () => { stop(0) })

emit({ event: 'ready', ...info() })
log('ready', node.peerId.toString())

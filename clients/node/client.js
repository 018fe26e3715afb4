'use strict';
/**
 * A small Node.js client for ortserve (and other Open Inference Protocol / KServe v2 gRPC servers).
 *
 * The services come from the repository's .proto files, loaded at run time with @grpc/proto-loader, so there is
 * no generated code to keep in step with protos/. ORTSERVE_PROTOS names another directory holding the same files
 * (for a copy of this client outside the repository).
 *
 * Tensors travel raw (`raw_input_contents` / `raw_output_contents`): elements little-endian in row-major order,
 * each BYTES element preceded by its length as a 4-byte little-endian integer.
 */

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.ORTSERVE_PROTOS || path.resolve(__dirname, '..', '..', 'protos');

// keepCase: the proto's own field names (raw_input_contents), as every other client and the docs spell them.
// longs: Number: int64 fields here are shapes and counts, far below 2^53.
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

// Big tensors both ways: gRPC's default 4 MB receive limit is smaller than many models' inputs.
const CHANNEL_OPTIONS = { 'grpc.max_receive_message_length': 1 << 30, 'grpc.max_send_message_length': 1 << 30 };

/** Element size in bytes and the DataView accessors of each fixed-size datatype (BYTES is variable). */
const FIXED = {
  BOOL: { size: 1, get: (v, o) => v.getUint8(o) !== 0, set: (v, o, x) => v.setUint8(o, x ? 1 : 0) },
  UINT8: { size: 1, get: (v, o) => v.getUint8(o), set: (v, o, x) => v.setUint8(o, x) },
  UINT16: { size: 2, get: (v, o) => v.getUint16(o, true), set: (v, o, x) => v.setUint16(o, x, true) },
  UINT32: { size: 4, get: (v, o) => v.getUint32(o, true), set: (v, o, x) => v.setUint32(o, x, true) },
  UINT64: { size: 8, get: (v, o) => v.getBigUint64(o, true), set: (v, o, x) => v.setBigUint64(o, BigInt(x), true) },
  INT8: { size: 1, get: (v, o) => v.getInt8(o), set: (v, o, x) => v.setInt8(o, x) },
  INT16: { size: 2, get: (v, o) => v.getInt16(o, true), set: (v, o, x) => v.setInt16(o, x, true) },
  INT32: { size: 4, get: (v, o) => v.getInt32(o, true), set: (v, o, x) => v.setInt32(o, x, true) },
  INT64: { size: 8, get: (v, o) => v.getBigInt64(o, true), set: (v, o, x) => v.setBigInt64(o, BigInt(x), true) },
  FP32: { size: 4, get: (v, o) => v.getFloat32(o, true), set: (v, o, x) => v.setFloat32(o, x, true) },
  FP64: { size: 8, get: (v, o) => v.getFloat64(o, true), set: (v, o, x) => v.setFloat64(o, x, true) },
};

/** Loads both services from the .proto files. */
function loadServices(protoDir = PROTO_DIR) {
  const files = ['grpc_service.proto', 'text_generation.proto'].map((name) => path.join(protoDir, name));
  const definition = protoLoader.loadSync(files, { ...LOADER_OPTIONS, includeDirs: [protoDir] });
  const loaded = grpc.loadPackageDefinition(definition);
  return { Inference: loaded.inference.GRPCInferenceService, TextGeneration: loaded.ortserve.v1.TextGeneration };
}

/**
 * The command-line options every CLI takes to reach a server: an API key (or access token) sent as
 * `authorization: Bearer <key>` on every call (default: the ORTSERVE_API_KEY environment variable, which keeps it
 * out of the process list), and TLS: --tls-ca (the CA of the server's certificate), --tls-cert/--tls-key (mutual
 * TLS), --tls-server-name (when the address is not a name the certificate holds). Spread into parseArgs' options.
 */
const CONNECTION_OPTIONS = {
  'api-key': { type: 'string' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'tls-server-name': { type: 'string' },
};

/** Channel credentials from the parsed options: TLS when a CA or a client certificate is given, else plaintext. */
function channelCredentials(args) {
  if (!args['tls-ca'] && !args['tls-cert']) return grpc.credentials.createInsecure();
  if (Boolean(args['tls-cert']) !== Boolean(args['tls-key'])) {
    throw new Error('--tls-cert and --tls-key go together');
  }
  const read = (name) => (args[name] ? fs.readFileSync(args[name]) : null);
  return grpc.credentials.createSsl(read('tls-ca'), read('tls-key'), read('tls-cert'));
}

/** An interceptor that adds the bearer credential to every call's metadata (streams included). */
function bearerInterceptor(key) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', `Bearer ${key}`);
      next(metadata, listener);
    },
  });
}

/**
 * Clients of both services on one channel to host:port; close() ends it. `args`: the parsed CONNECTION_OPTIONS
 * (none given: plaintext, no key).
 */
function connect(url, args = {}) {
  const { Inference, TextGeneration } = loadServices();
  const options = { ...CHANNEL_OPTIONS };
  if (args['tls-server-name']) options['grpc.ssl_target_name_override'] = args['tls-server-name'];
  const key = args['api-key'] || process.env.ORTSERVE_API_KEY;
  const interceptors = key ? [bearerInterceptor(key)] : [];
  const inference = new Inference(url, channelCredentials(args), { ...options, interceptors });
  // The second client shares the first one's channel.
  const generation = new TextGeneration(url, null, { channelOverride: inference.getChannel(), interceptors });
  return { inference, generation, close: () => inference.close() };
}

/** A deadline `seconds` from now, as grpc-js call options take it. */
function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

/** A unary call as a promise. */
function unary(client, method, request, timeoutS = 30) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(timeoutS), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function elementCount(shape) {
  return shape.reduce((count, dim) => count * Number(dim), 1);
}

/** Values (a flat array in row-major order) as raw contents of the datatype. */
function encodeRaw(datatype, values) {
  if (datatype === 'BYTES') {
    const parts = [];
    for (const value of values) {
      const data = Buffer.isBuffer(value) ? value : Buffer.from(String(value), 'utf8');
      const length = Buffer.alloc(4);
      length.writeUInt32LE(data.length, 0);
      parts.push(length, data);
    }
    return Buffer.concat(parts);
  }
  const type = FIXED[datatype];
  if (!type) throw new Error(`no raw encoding for datatype ${datatype} in this client`);
  const out = Buffer.alloc(values.length * type.size);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  values.forEach((value, index) => type.set(view, index * type.size, value));
  return out;
}

/** Raw contents as a flat array: numbers (BigInt for 64-bit integers), booleans, or Buffers for BYTES. */
function decodeRaw(datatype, raw) {
  if (datatype === 'BYTES') {
    const elements = [];
    for (let offset = 0; offset < raw.length;) {
      if (offset + 4 > raw.length) throw new Error('BYTES contents end inside a length prefix');
      const length = raw.readUInt32LE(offset);
      offset += 4;
      if (offset + length > raw.length) throw new Error('a BYTES element runs past the end of the contents');
      elements.push(raw.subarray(offset, offset + length));
      offset += length;
    }
    return elements;
  }
  const type = FIXED[datatype];
  if (!type) throw new Error(`no raw decoding for datatype ${datatype} in this client`);
  if (raw.length % type.size !== 0) throw new Error(`${raw.length} bytes are not whole ${datatype} elements`);
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  return Array.from({ length: raw.length / type.size }, (_, index) => type.get(view, index * type.size));
}

// The typed `contents` field of each datatype, for servers that answer without raw contents.
const CONTENTS_FIELDS = {
  BOOL: 'bool_contents', UINT8: 'uint_contents', UINT16: 'uint_contents', UINT32: 'uint_contents',
  UINT64: 'uint64_contents', INT8: 'int_contents', INT16: 'int_contents', INT32: 'int_contents',
  INT64: 'int64_contents', FP32: 'fp32_contents', FP64: 'fp64_contents', BYTES: 'bytes_contents',
};

/** One input: its tensor metadata and raw contents, for inferRequest. */
function tensor(name, datatype, shape, values) {
  if (values.length !== elementCount(shape)) {
    throw new Error(`input ${name}: ${values.length} values for shape [${shape}]`);
  }
  return { name, datatype, shape, raw: encodeRaw(datatype, values) };
}

/** A request parameter (InferParameter) from a JavaScript value. */
function parameter(value) {
  if (typeof value === 'boolean') return { bool_param: value };
  if (typeof value === 'string') return { string_param: value };
  if (Number.isInteger(value)) return { int64_param: value };
  return { double_param: value };
}

/** A ModelInferRequest from tensors; `parameters` is a plain object of request parameters. */
function inferRequest(model, tensors, { id = '', outputs = [], parameters = {}, version = '' } = {}) {
  const params = Object.fromEntries(Object.entries(parameters).map(([key, value]) => [key, parameter(value)]));
  return {
    model_name: model,
    model_version: version,
    id,
    parameters: params,
    inputs: tensors.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
    outputs: outputs.map((name) => ({ name })),
    raw_input_contents: tensors.map((t) => t.raw),
  };
}

/** A ModelInferResponse's outputs by name: { datatype, shape, data } with data a flat array. */
function decodeOutputs(response) {
  const out = {};
  response.outputs.forEach((output, index) => {
    const raw = response.raw_output_contents[index];
    const data = raw !== undefined
      ? decodeRaw(output.datatype, raw)
      : Array.from(output.contents[CONTENTS_FIELDS[output.datatype]] || []);
    out[output.name] = { datatype: output.datatype, shape: output.shape.map(Number), data };
  });
  return out;
}

/** The process exit for a failed call: the gRPC status name and message on stderr, status 1. */
function exitWithError(error) {
  const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code);
  process.stderr.write(`\nerror: ${name || 'ERROR'}: ${error.details || error.message}\n`);
  process.exit(1);
}

module.exports = {
  PROTO_DIR, CONNECTION_OPTIONS, connect, loadServices, unary, deadline, encodeRaw, decodeRaw, tensor,
  inferRequest, decodeOutputs, elementCount, exitWithError,
};

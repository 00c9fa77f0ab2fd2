// A Provider client in Node.js, written from the documentation in
// protos/c2d/provider/v1/provider.proto only: it loads the project's .proto files with
// @grpc/proto-loader, signs with ethers and computes every request digest itself.
//
// Input (environment):
//   C2D_PROVIDER     host:port of the Provider
//   C2D_PRIVATE_KEY  hex private key of a data owner of the node
//   C2D_DATA_FILE    absolute path of a dataset file under the node's data root
//   C2D_ALGORITHM    the algorithm's code (a Python script)
//
// Output: one JSON line on stdout with what the job did; any failure exits non-zero.

import { createHash, randomUUID } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { ethers } from "ethers";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const DEADLINE_MS = 30_000;

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

// -- the protos ------------------------------------------------------------------------------

const definition = protoLoader.loadSync("c2d/provider/v1/provider.proto", {
  includeDirs: [
    join(ROOT, "protos"),
    join(ROOT, "third_party", "googleapis"),
    // proto-loader's own copy of the well-known types (google/protobuf/*.proto).
    join(ROOT, "node_modules", "protobufjs"),
  ],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const proto = grpc.loadPackageDefinition(definition);
const ProviderService = proto.c2d.provider.v1.ProviderService;

// -- the signing scheme, as the proto documents it -------------------------------------------

// RFC 8785 canonical JSON. JSON.stringify already gives the canonical form of strings,
// finite numbers (ECMAScript number serialization), booleans and null; objects need their
// keys sorted by UTF-16 code units (JavaScript's default sort order), recursively.
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  }
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new Error("RFC 8785 has no form for NaN or Infinity");
  }
  if (value === undefined) throw new Error("undefined has no JSON form");
  return JSON.stringify(value);
}

const sha256Hex = (data) => createHash("sha256").update(data).digest("hex");

function requestDigest(fields) {
  return sha256Hex(Buffer.from(canonical(fields), "utf8"));
}

let lastNonce = 0n;
function nextNonce() {
  // Microseconds since the epoch, and always larger than the last one.
  const now = BigInt(Date.now()) * 1000n;
  lastNonce = now > lastNonce ? now : lastNonce + 1n;
  return lastNonce.toString();
}

function signedText(address, nonce, command, digest) {
  return `${address}${nonce}${command}${digest}`;
}

// The documented scheme: keccak256 of the UTF-8 text, signed as an EIP-191 message of 32 bytes.
async function signatureMetadata(wallet, command, fields, { nonce, rawText = false } = {}) {
  const address = wallet.address;
  const usedNonce = nonce ?? nextNonce();
  const text = signedText(address, usedNonce, command, requestDigest(fields));
  const hash = ethers.keccak256(ethers.toUtf8Bytes(text));
  // rawText: the mistake the docs warn against, signing the text instead of its hash.
  const signature = rawText
    ? await wallet.signMessage(text)
    : await wallet.signMessage(ethers.getBytes(hash));
  const metadata = new grpc.Metadata();
  metadata.set("x-c2d-address", address);
  metadata.set("x-c2d-nonce", usedNonce);
  metadata.set("x-c2d-signature", signature);
  return { metadata, nonce: usedNonce };
}

function bearer(token) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

// The "Digest:" lists of provider.proto, one per RPC used here.
const metadataFields = (m = {}) => [
  m.title ?? "",
  m.description ?? "",
  m.author ?? "",
  m.license ?? "",
  [...(m.tags ?? [])],
];

const pricing = (p = {}) => [p.datatoken ?? "", p.service_index ?? 0, p.exchange_id ?? ""];

const container = (c = {}) => [c.image ?? "", c.tag ?? "", c.checksum ?? ""];

// An enum field digests as its number; requests here spell it by name (or leave it out: 0).
function enumNumber(type, value) {
  if (value === undefined || typeof value === "number") return value ?? 0;
  const found = definition[type].type.value.find((v) => v.name === value);
  if (!found) throw new Error(`${type} has no value ${value}`);
  return found.number;
}

// <delivery>: null when unset, the S3 fields in order, or the upload URLs as an object.
function deliveryFields(d) {
  if (d?.s3) {
    const s = d.s3;
    return [
      s.endpoint ?? "",
      s.region ?? "",
      s.bucket ?? "",
      s.prefix ?? "",
      s.access_key_id ?? "",
      s.secret_access_key ?? "",
      s.session_token ?? "",
    ];
  }
  if (d?.upload_urls) return { ...(d.upload_urls.urls ?? {}) };
  return null;
}

const DIGESTS = {
  CreateAuthToken: (r) => [Number(r.valid_for?.seconds ?? 0)],
  PublishAlgorithm: (r) => [
    r.request_id ?? "",
    metadataFields(r.metadata),
    sha256Hex(r.code),
    r.entrypoint ?? "",
    // The enum's number; this client publishes with the default (private).
    0,
    // No parameter declaration.
    [],
    pricing(r.pricing),
    container(r.container),
  ],
  PublishDataset: (r) => {
    const p = r.policy ?? {};
    return [
      r.request_id ?? "",
      metadataFields(r.metadata),
      [...(r.file_paths ?? [])],
      // int64 fields arrive as strings (longs: String): the digest has them as numbers.
      (r.files ?? []).map((f) => [
        f.path ?? "",
        f.url ?? "",
        f.credentials ?? "",
        Number(f.size_bytes ?? 0),
        f.sha256 ?? "",
      ]),
      [
        p.allow_raw_algorithm ?? false,
        p.allow_network_access ?? false,
        Number(p.timeout?.seconds ?? 0),
        (p.publisher_trusted_algorithms ?? []).map((t) => [
          t.did ?? "",
          t.files_checksum ?? "",
          t.container_section_checksum ?? "",
        ]),
        [...(p.publisher_trusted_algorithm_publishers ?? [])],
        (p.parameter_bounds ?? []).map((b) => [
          b.name ?? "",
          b.algorithm_did ?? "",
          b.minimum ?? null,
          b.maximum ?? null,
        ]),
        p.allow_derived_datasets ?? false,
      ],
      r.sample_of ?? "",
      pricing(r.pricing),
    ];
  },
  StartCompute: (r) => [
    r.request_id ?? "",
    r.dataset ?? "",
    [...(r.additional_datasets ?? [])],
    r.algorithm ?? "",
    r.raw_algorithm?.code ? sha256Hex(Buffer.from(r.raw_algorithm.code, "utf8")) : "",
    r.raw_algorithm?.entrypoint ?? "",
    container(r.raw_algorithm?.container),
    structToJson(r.parameters),
    r.environment ?? "",
    [...(r.viewers ?? [])],
    [
      Number(r.resources?.cpus ?? 0),
      Number(r.resources?.memory_bytes ?? 0),
      Number(r.resources?.disk_bytes ?? 0),
      Number(r.resources?.max_duration?.seconds ?? 0),
    ],
    r.require_network ?? false,
    [...(r.orders ?? [])],
    enumNumber("c2d.common.v1.ResultSelection", r.results),
    deliveryFields(r.delivery),
  ],
  GetJob: (r) => [r.name ?? ""],
  StreamJobLogs: (r) => [r.name ?? "", Number(r.offset ?? 0)],
  DownloadResult: (r) => [r.name ?? "", Number(r.offset ?? 0)],
};

// google.protobuf.Struct <-> plain JSON (proto-loader hands Struct over as a message).
function toValue(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}
function fromValue(v) {
  if ("nullValue" in v) return null;
  if ("numberValue" in v) return v.numberValue;
  if ("stringValue" in v) return v.stringValue;
  if ("boolValue" in v) return v.boolValue;
  if ("listValue" in v) return (v.listValue.values ?? []).map(fromValue);
  return structToJson(v.structValue);
}
function structToJson(struct) {
  const fields = struct?.fields ?? {};
  return Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, fromValue(v)]));
}

// -- calls -----------------------------------------------------------------------------------

const deadline = () => new Date(Date.now() + DEADLINE_MS);

function unary(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline() }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

async function signed(client, wallet, method, request, options = {}) {
  const { metadata } = await signatureMetadata(wallet, method, DIGESTS[method](request), options);
  return unary(client, method, request, metadata);
}

async function collect(stream) {
  const items = [];
  for await (const item of stream) items.push(item);
  return items;
}

// Runs `call` and returns the gRPC status code it failed with (or "OK").
async function statusOf(call) {
  try {
    await call();
    return "OK";
  } catch (error) {
    if (typeof error?.code !== "number") throw error;
    return error.code;
  }
}

async function main() {
  const client = new ProviderService(need("C2D_PROVIDER"), grpc.credentials.createInsecure());
  const wallet = new ethers.Wallet(need("C2D_PRIVATE_KEY"));
  const dataFile = need("C2D_DATA_FILE");
  const code = Buffer.from(need("C2D_ALGORITHM"), "utf8");
  const checks = {};

  // Refusals first, on a fresh address: a signature over the raw text (not its keccak256
  // hash) is UNAUTHENTICATED, and does not spend its nonce; reusing a nonce is refused.
  const tokenRequest = { valid_for: { seconds: 600, nanos: 0 } };
  const nonce = nextNonce();
  checks.raw_text_signature = await statusOf(() =>
    signed(client, wallet, "CreateAuthToken", tokenRequest, { nonce, rawText: true }),
  );
  checks.nonce_after_refused_signature = await statusOf(() =>
    signed(client, wallet, "CreateAuthToken", tokenRequest, { nonce }),
  );
  checks.reused_nonce = await statusOf(() =>
    signed(client, wallet, "CreateAuthToken", tokenRequest, { nonce }),
  );
  checks.lower_nonce = await statusOf(() =>
    signed(client, wallet, "CreateAuthToken", tokenRequest, {
      nonce: (BigInt(nonce) - 1n).toString(),
    }),
  );
  // A digest of other fields than the request's: the signature does not match.
  checks.wrong_digest = await statusOf(async () => {
    const { metadata } = await signatureMetadata(wallet, "CreateAuthToken", [3600]);
    return unary(client, "CreateAuthToken", tokenRequest, metadata);
  });

  // The whole job.
  const { algorithm } = await signed(client, wallet, "PublishAlgorithm", {
    request_id: randomUUID(),
    // Non-ASCII text: the canonical JSON is hashed as UTF-8, without escapes.
    metadata: {
      title: "Großbuchstaben ✓",
      description: "interop \"quoted\"\n",
      author: "node",
      license: "MIT",
      tags: ["interop", "node"],
    },
    code,
    entrypoint: "python3 $ALGO",
  });
  const { dataset } = await signed(client, wallet, "PublishDataset", {
    request_id: randomUUID(),
    metadata: { title: "greeting", tags: ["interop"] },
    file_paths: [dataFile],
    policy: {
      publisher_trusted_algorithms: [
        {
          did: algorithm.did,
          files_checksum: algorithm.files_checksum,
          container_section_checksum: algorithm.container_section_checksum,
        },
      ],
    },
  });
  // The same file again, beside a remote one, through `files`: the digest binds each
  // location, credential name, size and sha256. The Provider never reads the remote file.
  const mixed = await signed(client, wallet, "PublishDataset", {
    request_id: randomUUID(),
    metadata: { title: "mixed" },
    files: [
      { path: dataFile },
      {
        url: "https://data.example.invalid/interop/remote.csv",
        credentials: "interop-source",
        size_bytes: "4096",
        sha256: "ab".repeat(32),
      },
    ],
  });
  checks.files_published = mixed.dataset.files.map((f) => [f.index, f.size_bytes, f.sha256]);
  const { job } = await signed(client, wallet, "StartCompute", {
    request_id: randomUUID(),
    dataset: dataset.name,
    algorithm: algorithm.name,
    // Keys out of order at both levels, so the digest depends on RFC 8785's key sorting.
    parameters: toStruct({ x: 1, opts: { b: [true, null, "ü", 1.5], a: 0.25 } }),
    // The default, spelled out: an enum that digests as its number (1).
    results: "RESULT_SELECTION_OUTPUTS_AND_LOGS",
  });
  // A delivery in the digest, both forms. The signature is checked before anything else, so
  // PERMISSION_DENIED (7: a loopback destination this node does not allow), not
  // UNAUTHENTICATED (16), shows that the digest matched.
  const startDelivering = (delivery) =>
    statusOf(() =>
      signed(client, wallet, "StartCompute", {
        request_id: randomUUID(),
        dataset: dataset.name,
        algorithm: algorithm.name,
        results: "RESULT_SELECTION_OUTPUTS",
        delivery,
      }),
    );
  checks.delivery_s3 = await startDelivering({
    s3: {
      endpoint: "https://127.0.0.1:9",
      region: "eu-west-1",
      bucket: "interop-results",
      prefix: "runs/",
      access_key_id: "AKIAINTEROP",
      secret_access_key: "interop/secret+key",
      session_token: "interop-session",
    },
  });
  checks.delivery_upload_urls = await startDelivering({
    upload_urls: {
      // Out of order, so the digest depends on the object's key sorting.
      urls: {
        "result.txt": "https://127.0.0.1:9/put/result?X-Amz-Signature=ab",
        "logs/algorithm.log": "https://127.0.0.1:9/put/log?X-Amz-Signature=cd",
      },
    },
  });
  const { token } = await signed(client, wallet, "CreateAuthToken", {
    valid_for: { seconds: 3600, nanos: 0 },
  });

  const updates = await collect(
    client.WatchJob({ name: job.name }, bearer(token), { deadline: deadline() }),
  );
  const states = updates.map((u) => u.job.state).filter((s, i, all) => s !== all[i - 1]);
  const final = updates.at(-1).job;

  const chunks = await collect(
    client.StreamJobLogs({ name: job.name, offset: 0 }, bearer(token), { deadline: deadline() }),
  );
  const log = chunks.map((c) => c.chunk.text).join("");

  // The same log from an offset, signed instead of with the token (an int64 in the digest).
  const logsRequest = { name: job.name, offset: 3 };
  const resumed = await signatureMetadata(wallet, "StreamJobLogs", DIGESTS.StreamJobLogs(logsRequest));
  const rest = (
    await collect(client.StreamJobLogs(logsRequest, resumed.metadata, { deadline: deadline() }))
  )
    .map((c) => c.chunk.text)
    .join("");

  const output = final.results.find((r) => r.kind === "KIND_OUTPUT" && r.name === "result.txt");
  let content = null;
  let sha256 = null;
  if (output) {
    const parts = await collect(
      client.DownloadResult({ name: `${job.name}/results/${output.index}`, offset: 0 }, bearer(token), {
        deadline: deadline(),
      }),
    );
    const bytes = Buffer.concat(parts.map((p) => p.data));
    content = bytes.toString("utf8");
    sha256 = sha256Hex(bytes) === output.sha256 ? "match" : "mismatch";
  }
  // A signed read of the job, for a unary signed call that is not a publish.
  const fetched = await signed(client, wallet, "GetJob", { name: job.name });

  client.close();
  process.stdout.write(
    `${JSON.stringify({
      state: final.state,
      states,
      message: final.message,
      owner: final.owner,
      address: wallet.address,
      log,
      log_from_3: rest,
      content,
      sha256,
      get_job_state: fetched.job.state,
      checks,
    })}\n`,
  );
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  if (error?.code !== undefined) process.stderr.write(`gRPC code ${error.code}: ${error.details}\n`);
  process.exit(1);
});

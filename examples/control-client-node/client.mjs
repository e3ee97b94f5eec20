// A fedenc Control API client in Node.js, built from proto/ alone (no fedenc code).
//
//   npm install
//   node client.mjs HOST:PORT [ENCODER_TYPE] [ROUNDS]
//
// Submits a job (SubmitJob), prints its rounds live (WatchJob), downloads the encoder
// (DownloadEncoder: EncoderInfo, ParameterSetHeader, TensorChunks), decodes the float32
// tensors from their little-endian bytes and writes a summary to encoder.json. Plaintext only
// (a master started with --insecure); for TLS use grpc.credentials.createSsl(ca, key, cert).
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const protoRoot = join(here, "..", "..", "proto");
const definition = protoLoader.loadSync("fedenc/v1/control.proto", {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto (job_id, not jobId)
  longs: String, // uint64 offsets and lengths as strings: no precision loss
  enums: String, // "JOB_STATE_SUCCEEDED"
  defaults: true,
  oneofs: true, // event.event === "round" | "job"; part.part === "info" | ...
});
const { fedenc } = grpc.loadPackageDefinition(definition);

const [address = "127.0.0.1:9092", encoderType = "srgnn", rounds = "2"] = process.argv.slice(2);
const control = new fedenc.v1.Control(address, grpc.credentials.createInsecure());

const call = (method, request) =>
  new Promise((resolve, reject) =>
    control[method](request, (err, reply) => (err ? reject(err) : resolve(reply))),
  );

// Every message of a server stream, in order.
const collect = (stream, onMessage) =>
  new Promise((resolve, reject) => {
    stream.on("data", onMessage);
    stream.on("error", reject);
    stream.on("end", resolve);
  });

const DTYPES = { DTYPE_FLOAT32: [4, "getFloat32"], DTYPE_FLOAT64: [8, "getFloat64"] };

async function main() {
  const { children } = await call("ListChildren", {});
  console.log(`children: ${children.map((c) => `${c.name} (${c.state})`).join(", ") || "none"}`);

  // google.protobuf.Struct as protobufjs bundles it: camelCase even with keepCase
  // ({fields: {name: {numberValue | stringValue | boolValue: ...}}}).
  const spec = {
    encoder_type: encoderType,
    encoder_config: { fields: { hidden: { numberValue: 8 } } },
    rounds: Number(rounds),
  };
  const job = await call("SubmitJob", { spec, requester: "node example" });
  console.log(`job ${job.job_id}: ${job.state}`);

  let final;
  await collect(control.WatchJob({ job_id: job.job_id }), (event) => {
    if (event.event === "round") {
      const r = event.round;
      const recall = r.recall_at_20 ?? NaN;
      console.log(
        `round ${r.round}: ${r.participants.length}/${r.sampled.length} children, ` +
          `loss ${(r.loss ?? NaN).toFixed(4)}, Recall@20 ${recall.toFixed(2)}`,
      );
    } else {
      final = event.job;
    }
  });
  if (final.state !== "JOB_STATE_SUCCEEDED") {
    throw new Error(`job ${final.job_id} ended ${final.state}: ${final.error}`);
  }

  let info;
  let header;
  const buffers = new Map();
  await collect(control.DownloadEncoder({ job_id: job.job_id }), (part) => {
    if (part.part === "info") info = part.info;
    else if (part.part === "header") {
      header = part.header;
      for (const t of header.tensors) buffers.set(t.spec.name, Buffer.alloc(Number(t.byte_length)));
    } else part.chunk.data.copy(buffers.get(part.chunk.name), Number(part.chunk.offset));
  });

  const tensors = {};
  for (const t of header.tensors) {
    const [size, getter] = DTYPES[t.spec.dtype] ?? [];
    const bytes = buffers.get(t.spec.name);
    const shape = t.spec.shape.map(Number);
    if (!size) {
      tensors[t.spec.name] = { dtype: t.spec.dtype, shape };
      continue;
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let sumSquares = 0;
    let first = null;
    for (let i = 0; i < bytes.byteLength; i += size) {
      const value = view[getter](i, true); // little-endian, whatever this machine is
      if (first === null) first = value;
      sumSquares += value * value;
    }
    tensors[t.spec.name] = { dtype: t.spec.dtype, shape, first, l2: Math.sqrt(sumSquares) };
  }
  const summary = {
    job_id: info.job_id,
    encoder: info.encoder.type,
    rounds: info.rounds,
    stop_reason: info.stop_reason,
    final_metrics: info.final_metrics,
    tensors,
  };
  writeFileSync(join(here, "encoder.json"), JSON.stringify(summary, null, 2));
  console.log(
    `encoder of ${info.job_id}: ${header.tensors.length} tensors, ` +
      `${[...buffers.values()].reduce((n, b) => n + b.length, 0)} bytes -> encoder.json`,
  );
}

main()
  .catch((err) => {
    console.error(`error: ${err.details ?? err.message}`);
    process.exitCode = 1;
  })
  .finally(() => control.close());

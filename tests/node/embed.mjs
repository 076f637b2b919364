// A Node.js client of clipvision, loading proto/ as it is, for tests/test_polyglot.py.
//
// Usage: node embed.mjs HOST:PORT PROTO_ROOT IMAGE... [--text TEXT...]
//
// Calls GetModelInfo, EmbedImage once per image, EmbedImageStream once with
// every image and EmbedText once per text, and prints one JSON object:
//   {"models": [{"name", "embedding_dimension"}],
//    "unary":  [{"values": [...]} | {"code": 3, "details": "..."}],
//    "stream": [{"id": "0", "values": [...]} | {"id": "1", "error": {"code", "reason", "message"}}],
//    "texts":  [{"values": [...], "truncated": false} | {"code": 3, "details": "..."}]}
import { readFileSync } from "node:fs";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, protoRoot, ...rest] = process.argv.slice(2);
if (!address || !protoRoot) {
  console.error("usage: node embed.mjs HOST:PORT PROTO_ROOT IMAGE... [--text TEXT...]");
  process.exit(2);
}
const split = rest.indexOf("--text");
const paths = split < 0 ? rest : rest.slice(0, split);
const texts = split < 0 ? [] : rest.slice(split + 1);

const definition = protoLoader.loadSync("clipvision/v1/embedding_service.proto", {
  includeDirs: [protoRoot],
  keepCase: true, // field names as the proto spells them: embedding_dimension
  longs: String,
  enums: String,
  oneofs: true, // a virtual field names the oneof member that is set
});
const { clipvision } = grpc.loadPackageDefinition(definition);
const client = new clipvision.v1.EmbeddingService(address, grpc.credentials.createInsecure());
const deadline = () => ({ deadline: new Date(Date.now() + 30_000) });

function unary(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function stream(images) {
  return new Promise((resolve, reject) => {
    const call = client.EmbedImageStream(deadline());
    const results = [];
    call.on("data", (response) => {
      results.push(
        response.result === "embedding"
          ? { id: response.id, values: response.embedding.values }
          : { id: response.id, error: response.error },
      );
    });
    call.on("error", reject);
    call.on("end", () => resolve(results));
    images.forEach((content, index) => call.write({ id: String(index), image: { content } }));
    call.end();
  });
}

const images = paths.map((path) => readFileSync(path));
const info = await unary("GetModelInfo", {});
const single = [];
for (const content of images) {
  try {
    const response = await unary("EmbedImage", { image: { content } });
    single.push({ values: response.embedding.values });
  } catch (error) {
    single.push({ code: error.code, details: error.details });
  }
}
const streamed = await stream(images);
const embeddedTexts = [];
for (const text of texts) {
  try {
    const response = await unary("EmbedText", { text });
    // proto-loader leaves fields at their default (false) out of the object.
    embeddedTexts.push({ values: response.embedding.values, truncated: Boolean(response.embedding.truncated) });
  } catch (error) {
    embeddedTexts.push({ code: error.code, details: error.details });
  }
}
client.close();
console.log(
  JSON.stringify({
    models: info.models.map((m) => ({ name: m.name, embedding_dimension: m.embedding_dimension })),
    unary: single,
    stream: streamed,
    texts: embeddedTexts,
  }),
);

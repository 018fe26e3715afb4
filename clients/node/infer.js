#!/usr/bin/env node
'use strict';
/**
 * Classifies a digit image with unary ModelInfer and prints the predicted class.
 *
 *   node infer.js --url 127.0.0.1:8001 --image ../samples/digit_3.png      -> "predicted: 3"
 *
 * The image becomes the model's input as clients/predict.py makes it: gray, scaled to the input's last two
 * dimensions, bright digit on dark (a mostly-bright scan is inverted), values in [0, --pixel-max].
 */

const path = require('node:path');
const { parseArgs } = require('node:util');
const client = require('./client');
const { readGray, resizeArea } = require('./png');

const { values: args } = parseArgs({
  options: {
    ...client.CONNECTION_OPTIONS,
    url: { type: 'string', default: '127.0.0.1:8001' },
    model: { type: 'string', default: 'digits' },
    image: { type: 'string', default: path.join(__dirname, '..', 'samples', 'digit_7.png') },
    'pixel-max': { type: 'string', default: '16' },
    'timeout-s': { type: 'string', default: '30' },
  },
});

/** The image as the model's FP32 input: batch 1 where the model batches, [1, H, W] per image. */
function imageTensor(spec) {
  const shape = spec.shape.map(Number);
  const [height, width] = shape.slice(-2);
  const pixels = Array.from(resizeArea(readGray(args.image), width, height), (v) => v / 255);
  const invert = pixels.reduce((sum, v) => sum + v, 0) / pixels.length > 0.5;
  const scale = Number(args['pixel-max']);
  const values = pixels.map((v) => (invert ? 1 - v : v) * scale);
  return client.tensor(spec.name, 'FP32', shape.map((dim) => (dim === -1 ? 1 : dim)), values);
}

async function main() {
  const { inference, close } = client.connect(args.url, args);
  const timeoutS = Number(args['timeout-s']);
  try {
    const metadata = await client.unary(inference, 'ModelMetadata', { name: args.model }, timeoutS);
    const output = metadata.outputs[0].name;
    const request = client.inferRequest(args.model, [imageTensor(metadata.inputs[0])], { outputs: [output] });
    const response = await client.unary(inference, 'ModelInfer', request, timeoutS);
    const scores = client.decodeOutputs(response)[output].data;
    const best = scores.indexOf(Math.max(...scores));
    process.stderr.write(`${output}: ${scores.map((s) => s.toFixed(4)).join(' ')}\n`);
    process.stdout.write(`predicted: ${best}\n`);
  } catch (error) {
    client.exitWithError(error);
  } finally {
    close();
  }
}

main();

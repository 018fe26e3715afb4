'use strict';
/**
 * Just enough PNG reading for the digit samples, so the Node client needs no image library: 8-bit, not
 * interlaced, grayscale / RGB / with alpha (colour types 0, 2, 4, 6), returned as 8-bit gray.
 */

const fs = require('node:fs');
const zlib = require('node:zlib');

const SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const CHANNELS = { 0: 1, 2: 3, 4: 2, 6: 4 };

/** The file's chunks: IHDR fields and the concatenated IDAT data. */
function readChunks(data) {
  if (!data.subarray(0, 8).equals(SIGNATURE)) throw new Error('not a PNG file');
  let header = null;
  const idat = [];
  for (let offset = 8; offset + 8 <= data.length;) {
    const length = data.readUInt32BE(offset);
    const type = data.toString('latin1', offset + 4, offset + 8);
    const body = data.subarray(offset + 8, offset + 8 + length);
    if (type === 'IHDR') {
      header = {
        width: body.readUInt32BE(0), height: body.readUInt32BE(4), bitDepth: body[8], colorType: body[9],
        interlace: body[12],
      };
    } else if (type === 'IDAT') {
      idat.push(body);
    } else if (type === 'IEND') {
      break;
    }
    offset += 12 + length; // length, type, body, CRC
  }
  if (!header) throw new Error('PNG without IHDR');
  return { header, compressed: Buffer.concat(idat) };
}

/** The Paeth predictor of the PNG specification. */
function paeth(left, up, upLeft) {
  const estimate = left + up - upLeft;
  const [dLeft, dUp, dUpLeft] = [Math.abs(estimate - left), Math.abs(estimate - up), Math.abs(estimate - upLeft)];
  if (dLeft <= dUp && dLeft <= dUpLeft) return left;
  return dUp <= dUpLeft ? up : upLeft;
}

/** Undoes each scanline's filter (types 0-4) in place; returns the rows without their filter bytes. */
function unfilter(raw, height, stride, bpp) {
  const out = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const left = x >= bpp ? out[y * stride + x - bpp] : 0;
      const up = y > 0 ? out[(y - 1) * stride + x] : 0;
      const upLeft = x >= bpp && y > 0 ? out[(y - 1) * stride + x - bpp] : 0;
      const predictor = [0, left, up, (left + up) >> 1, paeth(left, up, upLeft)][filter];
      if (predictor === undefined) throw new Error(`unknown PNG filter ${filter}`);
      out[y * stride + x] = (line[x] + predictor) & 0xff;
    }
  }
  return out;
}

/** A PNG file as { width, height, gray } with gray one byte per pixel, row-major (luma as Pillow's "L"). */
function readGray(file) {
  const { header, compressed } = readChunks(fs.readFileSync(file));
  const channels = CHANNELS[header.colorType];
  if (header.bitDepth !== 8 || header.interlace !== 0 || !channels) {
    throw new Error(`${file}: only 8-bit, non-interlaced gray or RGB(A) PNGs are read here`);
  }
  const stride = header.width * channels;
  const pixels = unfilter(zlib.inflateSync(compressed), header.height, stride, channels);
  const gray = Buffer.alloc(header.width * header.height);
  for (let i = 0; i < gray.length; i++) {
    const p = i * channels;
    gray[i] = channels >= 3 ? Math.round((pixels[p] * 299 + pixels[p + 1] * 587 + pixels[p + 2] * 114) / 1000)
      : pixels[p];
  }
  return { width: header.width, height: header.height, gray };
}

/** Box-averages a gray image down to width x height; returns values in [0, 255] as floats, row-major. */
function resizeArea({ width, height, gray }, outWidth, outHeight) {
  const out = new Float64Array(outWidth * outHeight);
  for (let y = 0; y < outHeight; y++) {
    const [y0, y1] = [Math.floor((y * height) / outHeight), Math.max(Math.floor(((y + 1) * height) / outHeight), 1)];
    for (let x = 0; x < outWidth; x++) {
      const [x0, x1] = [Math.floor((x * width) / outWidth), Math.max(Math.floor(((x + 1) * width) / outWidth), 1)];
      let sum = 0;
      for (let sy = y0; sy < Math.max(y1, y0 + 1); sy++) {
        for (let sx = x0; sx < Math.max(x1, x0 + 1); sx++) sum += gray[sy * width + sx];
      }
      out[y * outWidth + x] = sum / (Math.max(y1 - y0, 1) * Math.max(x1 - x0, 1));
    }
  }
  return out;
}

module.exports = { readGray, resizeArea };

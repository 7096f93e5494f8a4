// PaliGemma's detection answers as boxes: the same parser as pgexport's Python one
// (pgexport/structured.py, whose docstring is the full description) and Swift one. Plain ES module,
// no dependencies: a browser or bundler imports it as is; Node imports it from an ES module context
// (a package with "type": "module", or the file renamed .mjs).
//
//   import { parseDetections } from './paligemma_structured.js';
//   parseDetections('<loc0256><loc0000><loc0511><loc0255> circle', 640, 480);
//   // -> [{ label: 'circle', x0: 0, y0: 120, x1: 159.375, y1: 239.53125, bins: [256, 0, 511, 255], score: null, codes: [] }]
//
// An answer is objects joined by ";", each <loc y0><loc x0><loc y1><loc x1> (bins 0..1023 of the model's
// square input) and a label. Text before an object is skipped, spaces may sit between the tokens, up
// to 16 <segNNN> tokens may follow them (a segment answer's mask codes: `codes` holds their numbers
// when there are exactly 16, each under 128, else []; the artifact's onnx/seg_decoder.onnx turns
// them into a 64 x 64 mask over the box, > 0 inside), the label runs to the next ";" or "<" (spaces trimmed,
// "" when missing). Not a box: fewer than four location tokens in a row, a number over 1023, or no
// extent (y1 <= y0 or x1 <= x0). A bin is bin / 1024 of the side (end bins too, as Google's reference
// parser reads them); x scales by the original image's width and y by its height (the processor
// resizes the whole image to the square input), so boxes are in the original image's pixels.

export const LOC_BINS = 1024;

// The same pattern as structured.py's DETECTION, character for character.
const DETECTION = /<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>((?:[ \t\r\n]*<seg[0-9]{3}>){0,16})([^;<]*)/g;
const SEG = /<seg([0-9]{3})>/g;
const SEG_CODES = 16, SEG_BOOK = 128;

function trimSpaces(text) {
  return text.replace(/^[ \t\r\n]+|[ \t\r\n]+$/g, '');
}

export function parseDetections(text, width, height) {
  if (!(width > 0 && height > 0 && Number.isFinite(width) && Number.isFinite(height))) {
    throw new RangeError(`image size ${width} x ${height}: give positive finite numbers`);
  }
  const boxes = [];
  for (const match of String(text).matchAll(DETECTION)) {
    const bins = match.slice(1, 5).map((value) => parseInt(value, 10));
    const [y0, x0, y1, x1] = bins;
    if (Math.max(...bins) >= LOC_BINS || y1 <= y0 || x1 <= x0) continue;
    let codes = [...match[5].matchAll(SEG)].map((seg) => parseInt(seg[1], 10));
    if (codes.length !== SEG_CODES || Math.max(...codes) >= SEG_BOOK) codes = [];
    boxes.push({
      label: trimSpaces(match[6]),
      x0: x0 / LOC_BINS * width,
      y0: y0 / LOC_BINS * height,
      x1: x1 / LOC_BINS * width,
      y1: y1 / LOC_BINS * height,
      bins,
      score: null,
      codes,
    });
  }
  return boxes;
}

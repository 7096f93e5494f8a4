// PaliGemma's detection answers as boxes: the same parser as pgexport's Python one
// (pgexport/structured.py, whose docstring is the full description) and JavaScript one. Foundation
// only; add the file to an app target beside the Core ML packages.
//
//   let boxes = parseDetections("<loc0256><loc0000><loc0511><loc0255> circle", width: 640, height: 480)
//   // [Detection(label: "circle", x0: 0.0, y0: 120.0, x1: 159.375, y1: 239.53125, bins: [256, 0, 511, 255], codes: [])]
//
// An answer is objects joined by ";", each <loc y0><loc x0><loc y1><loc x1> (bins 0..1023 of the model's
// square input) and a label. Text before an object is skipped, spaces may sit between the tokens, up
// to 16 <segNNN> tokens may follow them (a segment answer's mask codes: `codes` holds their numbers
// when there are exactly 16, each under 128, else []; seg_decoder.mlpackage turns them into a
// 64 x 64 mask over the box, > 0 inside), the label runs to the next ";" or "<" (spaces trimmed,
// "" when missing). Not a box: fewer than four location tokens in a row, a number over 1023, or no
// extent (y1 <= y0 or x1 <= x0). A bin is bin / 1024 of the side (end bins too, as Google's reference
// parser reads them); x scales by the original image's width and y by its height (the processor, and
// the vision package's scaleFill, resize the whole image to the square input), so boxes are in the
// original image's pixels. A width or height that is not a positive finite number gives no boxes.

import Foundation

public struct Detection: Equatable, CustomStringConvertible {
    public let label: String
    /// The box in the original image's pixels: x0, y0 the top-left corner, x1, y1 the bottom-right one.
    public let x0: Double
    public let y0: Double
    public let x1: Double
    public let y1: Double
    /// The bins the model wrote, in its order: y0, x0, y1, x1.
    public let bins: [Int]
    /// A segment answer's 16 mask codes (the <segNNN> numbers, for seg_decoder.mlpackage), else [].
    public let codes: [Int]

    public var description: String {
        "Detection(label: \(label.debugDescription), x0: \(x0), y0: \(y0), x1: \(x1), y1: \(y1), bins: \(bins), codes: \(codes))"
    }
}

public let locBins = 1024
public let segCodes = 16
public let segBook = 128

// The same pattern as structured.py's DETECTION, character for character (ICU reads \t \r \n).
// Compiled per call, not held in a global: NSRegularExpression is not Sendable under Swift 6.
private func detectionRegex() -> NSRegularExpression {
    try! NSRegularExpression(pattern: #"<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>[ \t\r\n]*<loc([0-9]{4})>((?:[ \t\r\n]*<seg[0-9]{3}>){0,16})([^;<]*)"#)
}

private func segRegex() -> NSRegularExpression {
    try! NSRegularExpression(pattern: #"<seg([0-9]{3})>"#)
}

public func parseDetections(_ text: String, width: Double, height: Double) -> [Detection] {
    guard width > 0, height > 0, width.isFinite, height.isFinite else { return [] }
    let source = text as NSString
    var boxes: [Detection] = []
    let labelSpaces = CharacterSet(charactersIn: " \t\r\n")
    for match in detectionRegex().matches(in: text, range: NSRange(location: 0, length: source.length)) {
        let bins = (1...4).map { Int(source.substring(with: match.range(at: $0))) ?? locBins }
        let (y0, x0, y1, x1) = (bins[0], bins[1], bins[2], bins[3])
        if bins.contains(where: { $0 >= locBins }) || y1 <= y0 || x1 <= x0 { continue }
        let run = source.substring(with: match.range(at: 5))
        let runText = run as NSString
        var codes = segRegex().matches(in: run, range: NSRange(location: 0, length: runText.length))
            .map { Int(runText.substring(with: $0.range(at: 1))) ?? segBook }
        if codes.count != segCodes || codes.contains(where: { $0 >= segBook }) { codes = [] }
        let label = source.substring(with: match.range(at: 6)).trimmingCharacters(in: labelSpaces)
        let bin = Double(locBins)
        boxes.append(Detection(label: label,
                               x0: Double(x0) / bin * width, y0: Double(y0) / bin * height,
                               x1: Double(x1) / bin * width, y1: Double(y1) / bin * height,
                               bins: bins, codes: codes))
    }
    return boxes
}

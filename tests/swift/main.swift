// pgexport/structured.swift against pgexport's Python parser, compiled with it on macOS
// (.github/workflows/coreml-macos.yml; tests/test_structured.py where swiftc is on PATH):
//
//   swiftc pgexport/structured.swift tests/swift/main.swift -o structured-check && ./structured-check cases.json
//
// cases.json is tests/test_structured.py's cases_json(): [{"text", "width", "height", "boxes": [{"label",
// "x0", "y0", "x1", "y1", "bins", "codes"}]}], "boxes" being what the Python parser returned. Exits 1 on any difference.

import Foundation

let arguments = CommandLine.arguments
guard arguments.count == 2, let data = FileManager.default.contents(atPath: arguments[1]),
      let cases = (try? JSONSerialization.jsonObject(with: data)) as? [[String: Any]] else {
    print("usage: structured-check CASES.json (a JSON list of cases)")
    exit(2)
}

func number(_ value: Any?) -> Double { (value as? NSNumber)?.doubleValue ?? .nan }

var failures = 0
for item in cases {
    let text = item["text"] as? String ?? ""
    let boxes = parseDetections(text, width: number(item["width"]), height: number(item["height"]))
    let expected = item["boxes"] as? [[String: Any]] ?? []
    var same = boxes.count == expected.count
    for (box, want) in zip(boxes, expected) {
        let coordinates = ["x0", "y0", "x1", "y1"].map { number(want[$0]) }
        let bins = (want["bins"] as? [Any] ?? []).map { Int(exactly: number($0)) ?? -1 }
        let codes = (want["codes"] as? [Any] ?? []).map { Int(exactly: number($0)) ?? -1 }
        if box.label != (want["label"] as? String) || [box.x0, box.y0, box.x1, box.y1] != coordinates || box.bins != bins
            || box.codes != codes {
            same = false
        }
    }
    if !same {
        failures += 1
        print("differs on \(text.debugDescription): Swift \(boxes), Python \(expected)")
    }
}
// One known answer too, so that an empty or wrong cases file cannot pass.
let known = parseDetections("<loc0256><loc0000><loc0511><loc0255> circle", width: 640, height: 480)
if known != [Detection(label: "circle", x0: 0, y0: 120, x1: 159.375, y1: 239.53125, bins: [256, 0, 511, 255], codes: [])] {
    failures += 1
    print("differs on the known answer: \(known)")
}
print("\(cases.count + 1 - failures)/\(cases.count + 1) cases equal to pgexport's Python parser")
exit(failures == 0 ? 0 : 1)

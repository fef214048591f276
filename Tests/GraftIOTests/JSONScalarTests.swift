import Foundation
import Testing
import GraftIO

/// On Linux, JSONSerialization's NSNumbers for 0 and 1 also cast to Bool and `true` casts to Int: JSONScalar
/// must tell them apart the way the JSON text did (issue 11: `{"momentum": 0}` was rejected as a boolean).
@Suite struct JSONScalarTests {
    private func scalar(_ value: Any?) -> JSONScalar? {
        guard let value else { return nil }
        return JSONScalar(value)
    }

    private func decode(_ text: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    }

    @Test func decodedNumbersAreNumbersAndBooleansAreBooleans() throws {
        let o = try decode(#"{"zero": 0, "one": 1, "t": true, "f": false, "x": 0.0, "h": 1.5, "s": "1", "n": null}"#)
        #expect(scalar(o["zero"]) == .number(0))
        #expect(scalar(o["one"]) == .number(1))
        #expect(scalar(o["x"]) == .number(0))
        #expect(scalar(o["t"]) == .bool(true))
        #expect(scalar(o["f"]) == .bool(false))
        #expect(scalar(o["s"]) == .string("1"))
        #expect(scalar(o["n"]) == .null)
        #expect(JSONScalar(o["t"] as Any) == .bool(true))  // an optional boxed in Any: classified by its value
        #expect(JSONScalar.number(o["t"]) == nil && JSONScalar.bool(o["zero"]) == nil && JSONScalar.bool(o["one"]) == nil)
        #expect(JSONScalar.integer(o["one"]) == 1 && JSONScalar.integer(o["h"]) == nil && JSONScalar.integer(o["t"]) == nil)
        #expect(JSONScalar.describe(o["t"]) == "true" && JSONScalar.describe(o["zero"]) == "0")
        #expect(JSONScalar.describe(o["h"]) == "1.5" && JSONScalar.describe(o["s"]) == "\"1\"")
    }

    @Test func swiftValuesPutInByHandClassifyByTheirType() {
        let o: [String: Any] = ["i": 0, "b": true, "d": 2.5, "f": Float(1), "a": [1, 2]]
        #expect(scalar(o["i"]) == .number(0))
        #expect(scalar(o["b"]) == .bool(true))
        #expect(scalar(o["d"]) == .number(2.5))
        #expect(scalar(o["f"]) == .number(1))
        #expect(scalar(o["a"]) == nil)
        #expect(JSONScalar.integer(o["missing"]) == nil && JSONScalar.describe(nil) == "nothing")
    }
}

import MirrorCore
@testable import MirrorQMP
import MirrorSetup
import XCTest

final class QMPFramingTests: XCTestCase {
    func testSplitsObjectsSentBackToBackEvenByteByByte() throws {
        let input = Array(#"{"execute":"a","arguments":{"s":"}{\"'"}}{'execute':'b'}  [1,2]"#.utf8)
        var whole = QMPFramer(maximumSize: 1 << 20)
        let frames = try whole.feed(input)
        XCTAssertEqual(frames.map { String(decoding: $0, as: UTF8.self) },
                       [#"{"execute":"a","arguments":{"s":"}{\"'"}}"#, "{'execute':'b'}", "[1,2]"])
        var bytewise = QMPFramer(maximumSize: 1 << 20)
        var collected: [[UInt8]] = []
        for byte in input { collected += try bytewise.feed([byte]) }
        XCTAssertEqual(collected, frames)
    }

    func testGarbageOutsideBracketsBecomesItsOwnFrame() throws {
        var framer = QMPFramer(maximumSize: 1 << 20)
        let frames = try framer.feed(Array("hello {\"execute\":\"x\"} 42\n".utf8))
        XCTAssertEqual(frames.map { String(decoding: $0, as: UTF8.self) }, ["hello", "{\"execute\":\"x\"}", "42"])
    }

    func testAnUnterminatedHugeMessageIsRefusedAtTheCap() {
        var framer = QMPFramer(maximumSize: 1024)
        XCTAssertNoThrow(try framer.feed(Array("{\"execute\": \"".utf8)))
        XCTAssertThrowsError(try framer.feed([UInt8](repeating: UInt8(ascii: "a"), count: 2000))) {
            XCTAssertEqual($0 as? QMPFramer.FramingError, .tooLarge)
        }
    }

    func testParserKeepsMemberOrderAndAcceptsSingleQuotes() throws {
        let value = try QMPJSONParser.parse(Array("{'b': 1, \"a\": [true, null, \"x\\u0041\"], 'c': -2}".utf8))
        XCTAssertEqual(value, .object([("b", .int(1)), ("a", .array([.bool(true), .null, .string("xA")])), ("c", .int(-2))]))
        XCTAssertThrowsError(try QMPJSONParser.parse(Array("{\"a\": }".utf8)))
        XCTAssertThrowsError(try QMPJSONParser.parse(Array(String(repeating: "[", count: 100).utf8)))
    }
}

final class QMPDispatchTests: XCTestCase {
    /// Images the test made, removed at its end.
    private var images: [String] = []

    override func tearDown() {
        for path in images { try? FileManager.default.removeItem(atPath: path) }
        images = []
    }

    private func commands() -> QMPCommands {
        let path = NSTemporaryDirectory() + "/qmp-\(UUID().uuidString).raw"
        images.append(path)
        _ = FileManager.default.createFile(atPath: path, contents: Data(count: 65536))
        let pool = AlignedBufferPool(bufferSize: 65536)
        let device = try! FileBlockDevice(path: path, readOnly: false, bufferPool: pool)
        let setup = JobSetup(imageName: "disk.raw", mountpoint: NSTemporaryDirectory() + "/mnt", bufferPool: pool)
        return QMPCommands(filter: MirrorFilter(source: device, readOnly: false), setup: setup, package: "test", onQuit: {})
    }

    private func send(_ text: String, _ c: QMPCommands, _ session: inout QMPSession) -> String {
        c.handle(Array(text.utf8), session: &session)?.compactText ?? ""
    }

    func testNegotiationComesFirstAndOnlyOnce() {
        let c = commands()
        var s = QMPSession()
        XCTAssertEqual(send(#"{"execute":"query-block-jobs","id":7}"#, c, &s),
                       #"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7}"#)
        XCTAssertEqual(send(#"{"execute":"qmp_capabilities","arguments":{}}"#, c, &s), #"{"return": {}}"#)
        XCTAssertEqual(send(#"{"execute":"qmp_capabilities"}"#, c, &s),
                       #"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#)
        XCTAssertEqual(send(#"{"execute":"query-block-jobs","id":"x"}"#, c, &s), #"{"return": [], "id": "x"}"#)
    }

    func testErrorsHaveQEMUsClassesAndTexts() {
        let c = commands()
        var s = QMPSession()
        _ = send(#"{"execute":"qmp_capabilities"}"#, c, &s)
        let cases: [(String, String)] = [
            (#"{"execute":"nope"}"#, #"{"class": "CommandNotFound", "desc": "The command nope has not been found"}"#),
            (#"{"execute":"block-job-pause","arguments":{"device":"j"}}"#, #"{"class": "DeviceNotActive", "desc": "Block job 'j' not found"}"#),
            (#"{"execute":"job-pause","arguments":{"id":"j"}}"#, #"{"class": "GenericError", "desc": "Job not found"}"#),
            (#"{"execute":"block-job-pause","arguments":{"device":"j","x":1}}"#, #"{"class": "GenericError", "desc": "Parameter 'x' is unexpected"}"#),
            (#"{"execute":"block-job-pause","arguments":{}}"#, #"{"class": "GenericError", "desc": "Parameter 'device' is missing"}"#),
            (#"{"execute":"block-job-pause","arguments":{"device":3}}"#, #"{"class": "GenericError", "desc": "Invalid parameter type for 'device', expected: string"}"#),
            (#"{"execute":"block-job-set-speed","arguments":{"device":"j","speed":"fast"}}"#, #"{"class": "GenericError", "desc": "Invalid parameter type for 'speed', expected: integer"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"/x","sync":"sideways"}}"#, #"{"class": "GenericError", "desc": "Parameter 'sync' does not accept value 'sideways'"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"other","target":"/x","sync":"full"}}"#, #"{"class": "GenericError", "desc": "Cannot find device='other' nor node-name='other'"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"/x","sync":"full","granularity":1000}}"#, #"{"class": "GenericError", "desc": "Parameter 'granularity' expects a power of 2"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"/x","sync":"incremental"}}"#, #"{"class": "GenericError", "desc": "Sync mode 'incremental' not supported"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"/x","sync":"full","speed":-1}}"#, #"{"class": "GenericError", "desc": "Parameter 'speed' expects a non-negative value"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"nbd+unix:///?socket=/nonexistent.sock","sync":"full"}}"#, #"{"class": "GenericError", "desc": "Driver 'nbd' does not support image creation"}"#),
            (#"{"execute":"drive-mirror","arguments":{"device":"disk.raw","target":"nbd+unix:///x","sync":"full","mode":"existing"}}"#, #"{"class": "GenericError", "desc": "NBD URI 'nbd+unix:///x' needs ?socket=PATH"}"#),
            ("[1]", #"{"class": "GenericError", "desc": "QMP input must be a JSON object"}"#),
            (#"{"execute": }"#, #"{"class": "GenericError", "desc": "JSON parse error, expecting value"}"#),
            (#"{"arguments":{}}"#, #"{"class": "GenericError", "desc": "QMP input lacks member 'execute'"}"#),
        ]
        for (input, error) in cases {
            XCTAssertEqual(send(input, c, &s), #"{"error": "# + error + "}", input)
        }
    }
}

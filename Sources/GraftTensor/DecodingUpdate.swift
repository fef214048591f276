/// Adds something to output columns `rows` of a product's output `y` (row `i` of `y` at `y + i · ldy`): an
/// adapter's decoding-step update, run inside the product's parallel loop on the thread that owns those outputs.
public typealias OutputRowsUpdate = (_ rows: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) -> Void

/// The work behind a ``DecodingUpdate``: an object, so that an adapter can keep one for a whole generation and
/// hand it to every token's product without allocating anything.
public protocol DecodingWork: AnyObject {
    /// Runs one part of the work on the whole input: once each, on any thread, before ``apply(_:_:_:)``.
    func prepare(_ part: Int)
    /// ``prepare(_:)`` in the fast mode, given the input as the product quantized it (which the work may read
    /// instead of the float32 rows); the default ignores it.
    func prepare(_ part: Int, quantized input: Int8Rows)
    /// Adds the update into output rows `rows` of `y` (row `i` at `y + i · ldy`).
    func apply(_ rows: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int)
}

extension DecodingWork {
    public func prepare(_ part: Int, quantized input: Int8Rows) { prepare(part) }
}

/// An adapter's decoding-step update: `parts` independent pieces of work on the whole input (a few rank
/// components of a down projection each), `prepare(part)` for each, which must all have run before `apply` first
/// adds into output rows. The product that carries it shares the parts out over its threads beside its own rows.
public struct DecodingUpdate {
    /// How many parts ``prepare(_:)`` has.
    public let parts: Int
    /// What runs the parts and adds the update.
    public let work: any DecodingWork

    /// An update of `parts` parts run by `work`.
    public init(parts: Int, work: any DecodingWork) {
        self.parts = parts
        self.work = work
    }

    /// An update whose `apply` reads what the parts of `prepare` compute.
    public init(parts: Int, prepare: @escaping (Int) -> Void, apply: @escaping OutputRowsUpdate) {
        self.init(parts: parts, work: ClosureWork(prepare: prepare, apply: apply))
    }

    /// An update with nothing to prepare.
    public init(apply: @escaping OutputRowsUpdate) {
        self.init(parts: 0, prepare: { _ in }, apply: apply)
    }

    /// Runs part `part` (`0 ..< parts`): once each, on any thread, before ``apply(_:_:_:)``.
    public func prepare(_ part: Int) { work.prepare(part) }

    /// Runs part `part` given the input as the fast mode's product quantized it (`nil`: the product did not).
    public func prepare(_ part: Int, quantized input: Int8Rows?) {
        if let input { work.prepare(part, quantized: input) } else { work.prepare(part) }
    }

    /// Adds the update into a range of output rows.
    public func apply(_ rows: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) { work.apply(rows, y, ldy) }

    /// `updates` one after another as one update (itself when there is one), or nil when there are none.
    public static func combined(_ updates: [DecodingUpdate]) -> DecodingUpdate? {
        guard updates.count > 1 else { return updates.first }
        var starts: [Int] = [], total = 0
        for update in updates {
            starts.append(total)
            total += update.parts
        }
        return DecodingUpdate(parts: total, work: CombinedWork(updates: updates, starts: starts))
    }
}

/// Several updates' work one after another: their parts numbered in order.
private final class CombinedWork: DecodingWork {
    private let updates: [DecodingUpdate]
    /// Update `j`'s parts are `starts[j] ..< starts[j] + updates[j].parts`.
    private let starts: [Int]

    init(updates: [DecodingUpdate], starts: [Int]) {
        self.updates = updates
        self.starts = starts
    }

    func prepare(_ part: Int) { prepare(part, quantized: nil) }

    func prepare(_ part: Int, quantized input: Int8Rows) { prepare(part, quantized: Optional(input)) }

    private func prepare(_ part: Int, quantized input: Int8Rows?) {
        guard let index = starts.lastIndex(where: { $0 <= part }) else { return }
        updates[index].prepare(part - starts[index], quantized: input)
    }

    func apply(_ rows: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        for update in updates { update.apply(rows, y, ldy) }
    }
}

/// A ``DecodingWork`` made of two closures.
private final class ClosureWork: DecodingWork {
    private let prepareClosure: (Int) -> Void
    private let applyClosure: OutputRowsUpdate

    init(prepare: @escaping (Int) -> Void, apply: @escaping OutputRowsUpdate) {
        prepareClosure = prepare
        applyClosure = apply
    }

    func prepare(_ part: Int) { prepareClosure(part) }

    func apply(_ rows: Range<Int>, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) { applyClosure(rows, y, ldy) }
}

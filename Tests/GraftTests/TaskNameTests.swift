import Testing
import Graft

/// One task vocabulary for every door (issue 11, item 14): the CLI's `seq-cls`/`causal-lm`, the bindings'
/// `seq_cls`/`causal_lm`, the JSON names and PEFT's upper-case task types all name the same tasks.
@Suite struct TaskNameTests {
    @Test func everySpellingNamesItsTask() {
        let expected: [String: SessionTask] = [
            "base": .base, "seq-cls": .sequenceClassification, "seq_cls": .sequenceClassification,
            "sequence_classification": .sequenceClassification, "SEQ_CLS": .sequenceClassification,
            "causal-lm": .causalLM, "causal_lm": .causalLM, "CAUSAL_LM": .causalLM,
        ]
        for (name, task) in expected { #expect(SessionTask(name: name) == task, "\(name)") }
        #expect(SessionTask(name: "classification") == nil)
        #expect(SessionTask(name: "") == nil)
        for task in SessionTask.allCases { #expect(SessionTask(name: task.name) == task) }
    }

    @Test func theCLITrainsUnderEveryTrainableSpelling() throws {
        for name in ["seq-cls", "seq_cls", "sequence_classification", "SEQ_CLS"] {
            #expect(try SessionTask(trainingTaskName: name) == .sequenceClassification)
        }
        for name in ["causal-lm", "causal_lm", "CAUSAL_LM"] { #expect(try SessionTask(trainingTaskName: name) == .causalLM) }
        #expect(throws: GraftError.self) { try SessionTask(trainingTaskName: "base") }
        do {
            _ = try SessionTask(trainingTaskName: "translation")
            Issue.record("translation was accepted")
        } catch let e as GraftError {
            #expect(e.message.contains("'translation'") && e.message.contains("seq-cls, seq_cls, sequence_classification"))
        }
    }
}

extension Tensor {
    /// Records a custom operation whose result `output` was computed outside the built-in ops (fused kernels in
    /// other modules: routed expert mixtures, auxiliary router losses).
    ///
    /// `backward` receives the gradient of `output` and returns one gradient per entry of `inputs`, in order,
    /// each of that input's shape (nil where an input is not tracked). Nothing is recorded when grad mode is off
    /// or no input is tracked, so the call costs nothing at inference.
    public static func recordingCustomOp(_ output: Tensor, inputs: [Tensor],
                                         backward: @escaping (Tensor) -> [Tensor?]) -> Tensor {
        result(output, inputs: inputs, backward: backward)
    }
}

"""What int4 and int8 share: ONNX Runtime's MatMulNBits block quantization, its options and their checks."""

BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGOS = ("rtn", "k_quant")  # the builder's algo_config base methods ("rtn": its default quantizer, as no algo_config)


def options(q) -> dict:
    """The builder's ``--extra_options`` every MatMulNBits scheme passes."""
    opts = {"block_size": str(q.block_size), "is_symmetric": str(q.symmetric).lower()}
    if q.accuracy_level:
        opts["accuracy_level"] = str(q.accuracy_level)
    if q.algo != "rtn":
        opts["algo_config"] = q.algo
    return opts


def block_problems(q) -> list[str]:
    if q.block_size not in BLOCK_SIZES:
        return [f"block_size {q.block_size} is not supported for MatMulNBits (use one of {BLOCK_SIZES})"]
    return []


def accuracy_problems(q) -> list[str]:
    problems = []
    if q.accuracy_level not in (0, 1, 2, 3, 4):
        problems.append(f"accuracy_level {q.accuracy_level} is not one of 0 (default), 1, 2, 3, 4")
    if q.algo not in ALGOS:
        problems.append(f"algo = '{q.algo}' is not one of {ALGOS}")
    return problems

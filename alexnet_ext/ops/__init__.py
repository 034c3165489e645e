"""Python-side registration of the operators: fake (meta) kernels for
torch.compile and autograd formulas. One module per operator."""
from . import lrn  # noqa: F401
from . import maxpool  # noqa: F401
from . import lrn_pool  # noqa: F401
from . import conv  # noqa: F401

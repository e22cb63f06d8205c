"""eval: EleutherAI's lm-evaluation-harness with our model. lm.py: the lm-eval model "gptneox" (GPTNeoXLM), registered
on import; cli.py: `python -m gptneox.eval`, lm-eval's command line with that model. Guide: docs/evaluation.md."""

from .cli import main, usage
from .lm import MODEL_ARGS, MODEL_ARGS_HELP, MODEL_NAME, GPTNeoXLM, check_model_args

__all__ = ["GPTNeoXLM", "MODEL_ARGS", "MODEL_ARGS_HELP", "MODEL_NAME", "check_model_args", "main", "usage"]

"""The ``vkd`` command line.

Every command lives in the module of the part it drives and is imported only when it is
invoked: ``vkd --help`` must not pay for torch, transformers or peft.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

import vkd

# command name -> "module:attribute"; the modules import their heavy dependencies lazily too.
COMMANDS: dict[str, str] = {
    "model": "vkd.models.commands:model",
    "data": "vkd.data.commands:data",
    "eval": "vkd.evaluate:eval_command",
    "distill": "vkd.distill.commands:distill",
    "index": "vkd.indexer.commands:index",
    "dupes": "vkd.indexer.commands:dupes_command",
    "search": "vkd.retrieval.commands:search",
    "export": "vkd.export.commands:export",
    "demo": "vkd.demo:demo",
    "bench": "vkd.bench.commands:bench",
    "serve": "vkd.serve.commands:serve",
}

SHORT_HELP: dict[str, str] = {
    "model": "Random models (tiny, or at real sizes) and what a model directory is.",
    "data": "Prepare pair files: Flickr30k (Karpathy split) and synthetic scenes.",
    "eval": "Recall@1/5/10 of a model on a pair file, both directions.",
    "distill": "Teach a student from a teacher (CE + KD, LoRA) and write a merged model.",
    "index": "Encode an image folder into Arrow shards + FAISS indexes.",
    "dupes": "Find exact and near-duplicate images in an index.",
    "search": "Two-stage search: student ANN candidates, teacher rerank.",
    "export": "Export a student to ONNX (fp32 + INT8) with a parity check.",
    "demo": "The whole pipeline on synthetic data, on a CPU, in minutes.",
    "bench": "Latency and Recall benchmarks, written as JSON + Markdown + PNG.",
    "serve": "Serve search over HTTP with a web page.",
}


# A library that a slim install lacks -> the extra that brings it (pyproject.toml). The base
# install (and "vkd[serve]") has no torch: a command that needs it says which extra to add.
EXTRA_FOR: dict[str, str] = {
    **dict.fromkeys(("torch", "transformers", "peft", "accelerate", "safetensors", "onnx", "onnxscript"), "full"),
    **dict.fromkeys(("onnxruntime", "fastapi", "uvicorn", "multipart", "starlette"), "serve"),
    "matplotlib": "bench",
}


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0]
            if missing not in EXTRA_FOR:
                raise
            command = ctx.invoked_subcommand or "this command"
            raise click.ClickException(
                f"vkd {command} needs {missing}, which this install lacks (the base and \"vkd[serve]\" installs "
                f"leave out torch and the other training libraries): pip install \"vkd[{EXTRA_FOR[missing]}]\""
            ) from error

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._available(name))

    @staticmethod
    def _available(name: str) -> bool:
        # Parts not built yet (or removed from a slim install) drop out of the listing. Looked
        # up as files: importlib.util.find_spec would import each parent package, and so
        # whatever its __init__ imports, just to list the commands.
        parts = COMMANDS[name].split(":")[0].split(".")[1:]
        path = Path(vkd.__file__).parent.joinpath(*parts)
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not self._available(name):
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vkd")
def cli() -> None:
    """vkd: big-model image search accuracy at small-model cost.

    \b
    Quick start (CPU, no downloads):
      vkd demo                      # teacher, student, distillation, index, search, table
      vkd search "a dog on a beach"

    \b
    With your own models:
      vkd distill config.yaml --set epochs=3
      vkd index ./images --model out/student --teacher Qwen/Qwen3-VL-Embedding-8B
      vkd search "a dog on a beach" --index ./images.vkd
    """


def main() -> None:
    cli(prog_name="vkd")


if __name__ == "__main__":
    main()

"""``tokensteer formula ...``: check a formula (parsed tree, effective weights) and list recipes."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from tokensteer.formula.ast import Const, Guide, Model, Node, Op, Sum, fmt_num, fmt_str, to_string
from tokensteer.formula.guides import GUIDES

app = typer.Typer(
    help=(
        "Formulas over next-token distributions (model arithmetic).\n\n"
        "Terms: M (the model on the prompt), M(\"text\") (the prompt behind a conditioning text), "
        "M(\"text\", T=0.7), M(model=\"path\") (another local model, same tokenizer), C(\"positive\") "
        f"(an offline guide: {', '.join(GUIDES)}), numbers. Operators: + - * /, union(a, b) (max), "
        "softunion(a, b) (log-sum-exp), intersection(a, b) (min), topk(f, k), topp(f, p), nucleus(f, p) "
        "(the base model's nucleus), temp(f, T). Start with 'normalized:' for LMA's weighted average instead "
        "of plain logit arithmetic."
    ),
    no_args_is_help=True,
)


def _tree(n: Node, label: str, tree: Tree | None = None) -> Tree:
    text = f"{label}{_describe(n)}"
    node = Tree(text) if tree is None else tree.add(text)
    if isinstance(n, Sum):
        for w, t in n.terms:
            _tree(t, f"[cyan]×{fmt_num(w)}[/] ", node)
    elif isinstance(n, Op):
        for a in n.args:
            _tree(a, "", node)
    return node


def _describe(n: Node) -> str:
    if isinstance(n, Sum):
        return "[bold]sum[/]"
    if isinstance(n, Op):
        return f"[bold]{n.name}[/]" + (f" {fmt_num(n.param)}" if n.param is not None else "")
    if isinstance(n, Model):
        where = "the model" if n.model is None else f"model {escape(n.model)}"
        cond = f" behind {escape(fmt_str(n.prefix))}" if n.prefix else " on the prompt"
        t = f", T={fmt_num(n.temperature)}" if n.temperature != 1.0 else ""
        return f"{where}{cond}{t}"
    if isinstance(n, Guide):
        return f"guide {escape(fmt_str(n.name))} on the top {n.k} candidates"
    if isinstance(n, Const):
        return f"constant {fmt_num(n.value)}"
    return escape(to_string(n))


@app.command("check")
def check_cmd(formula: str = typer.Argument(..., help="A formula or a recipe name.")) -> None:
    """Parse a formula, print its tree and its effective weights, or say what is wrong.

    Examples:

      tokensteer formula check positive

      tokensteer formula check 'M + 2*(M("A happy story:\\n") - M("A sad story:\\n"))'

      tokensteer formula check 'normalized: M - 0.6*M("Adults talking:\\n")'
    """
    from tokensteer.cli_common import user_errors
    from tokensteer.formula.check import check
    from tokensteer.formula.fusion import fusion, prefixes_of
    from tokensteer.formula.parser import parse

    out = Console()
    with user_errors():
        f = parse(formula)
        report = check(f)
    out.print(f"[bold]formula[/] ({f.mode} mode): {escape(str(f))}", highlight=False)  # texts are not markup
    out.print(_tree(f.root, ""))
    t = Table(title="top-level weights", title_justify="left")
    for c in ("term", "kind", "written", "effective"):
        t.add_column(c, justify="right" if c in ("written", "effective") else "left", overflow="fold")
    for w in report.weights:
        t.add_row(escape(w.term), w.kind, f"{w.written:.4g}", f"{w.effective:.4g}")
    out.print(t)
    out.print(f"Σλ of the distribution terms as written: {report.total:.4g}")
    prefixes = prefixes_of(f.root)
    if prefixes:
        rows, fused = 1 + len(prefixes), fusion(f, prefixes)
        head = f"{1 + fused[1]} (the same-model terms are summed before it)" if fused else f"{rows} (a same-model term sits inside an operator)"
        out.print(f"per token: {rows} rows of one batched forward; the output layer runs on {head}; --trace runs it on all {rows}")
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command("recipes")
def recipes_cmd() -> None:
    """List the named recipes and the formula each expands to."""
    from tokensteer.formula.recipes import RECIPES

    out = Console()
    for r in RECIPES.values():
        out.print(f"[bold]{r.usage()}[/]", highlight=False)
        out.print(f"  {r.doc}", highlight=False)
        out.print(f"  [dim]{r.formula()}[/]", highlight=False)

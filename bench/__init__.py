

def md_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table (the benchmarks print these into docs/benchmarks.md)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows])

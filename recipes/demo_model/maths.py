"""Generated maths text with worked answers: arithmetic, fractions, percentages, algebra, word problems.

Our own generator (no licence questions). Every answer is computed, so the text is correct maths.
"""

from __future__ import annotations

import random
from fractions import Fraction
from math import gcd

NAMES = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yuki", "Zoe"]
ITEMS = [("apple", "apples"), ("book", "books"), ("pencil", "pencils"), ("marble", "marbles"), ("ticket", "tickets"),
         ("egg", "eggs"), ("stamp", "stamps"), ("card", "cards"), ("orange", "oranges"), ("cookie", "cookies")]
CONTAINERS = ["box", "bag", "crate", "basket", "packet", "jar"]


def _frac(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _signed(c: int, var: str = "", first: bool = False) -> str:
    """c*var as it would be written inside an expression."""
    mag = "" if abs(c) == 1 and var else str(abs(c))
    if first:
        return f"{'-' if c < 0 else ''}{mag}{var}"
    return f" {'-' if c < 0 else '+'} {mag}{var}"


def arithmetic(r: random.Random) -> str:
    a, b = r.randint(2, 999), r.randint(2, 999)
    op = r.choice("+-*/")
    if op == "+":
        return f"What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}."
    if op == "-":
        return f"Compute {a} - {b}.\nAnswer: {a} - {b} = {a - b}."
    if op == "*":
        a, b = r.randint(2, 99), r.randint(2, 99)
        t, u = divmod(b, 10)
        steps = f"{a} * {t * 10} + {a} * {u} = {a * t * 10} + {a * u}" if t and u else f"{a} * {b}"
        return f"Calculate {a} * {b}.\nAnswer: {steps} = {a * b}."
    q = r.randint(2, 60)
    d = r.randint(2, 40)
    return f"What is {q * d} divided by {d}?\nAnswer: {q * d} / {d} = {q}, because {d} * {q} = {q * d}."


def fractions(r: random.Random) -> str:
    a, b = Fraction(r.randint(1, 9), r.randint(2, 12)), Fraction(r.randint(1, 9), r.randint(2, 12))
    op = r.choice(["+", "-", "*"])
    res = a + b if op == "+" else a - b if op == "-" else a * b
    how = ""
    if op in "+-":
        den = a.denominator * b.denominator // gcd(a.denominator, b.denominator)
        x, y = a.numerator * (den // a.denominator), b.numerator * (den // b.denominator)
        how = f"With the common denominator {den}: {x}/{den} {op} {y}/{den} = {x + y if op == '+' else x - y}/{den}"
        how += f" = {_frac(res)}." if Fraction(x + y if op == "+" else x - y, den).denominator != den else "."
    else:
        how = f"Multiply numerators and denominators: {a.numerator * b.numerator}/{a.denominator * b.denominator} = {_frac(res)}."
    return f"Simplify {_frac(a)} {op} {_frac(b)}.\nAnswer: {how} The result is {_frac(res)}."


def percent(r: random.Random) -> str:
    p = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90])
    n = r.randint(2, 80) * 20
    v = Fraction(p * n, 100)
    return f"What is {p}% of {n}?\nAnswer: {p}% of {n} = {p}/100 * {n} = {_frac(v)}."


def linear(r: random.Random) -> str:
    x = r.randint(-20, 20)
    a = r.choice([i for i in range(-12, 13) if i not in (0,)])
    b = r.randint(-50, 50)
    c = a * x + b
    var = r.choice("xyzntk")
    lhs = _signed(a, var, first=True) + (_signed(b) if b else "")
    step = f"{_signed(a, var, first=True)} = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}" if b else f"{lhs} = {c}"
    return f"Solve {lhs} = {c} for {var}.\nAnswer: {step}, so {var} = {c - b} / {a} = {x}."


def system2(r: random.Random) -> str:
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    a, b, c, d = (r.choice([1, 2, 3, 4, 5, -1, -2, -3]) for _ in range(4))
    if a * d - b * c == 0:
        d += 1
    e, f = a * x + b * y, c * x + d * y
    det = a * d - b * c
    return (f"Solve the system {_signed(a, 'x', True)}{_signed(b, 'y')} = {e} and {_signed(c, 'x', True)}{_signed(d, 'y')} = {f}.\n"
            f"Answer: The determinant is {a}*{d} - {b}*{c} = {det}. By Cramer's rule x = ({e}*{d} - {b}*{f})/{det} = {x} "
            f"and y = ({a}*{f} - {e}*{c})/{det} = {y}.")


def expand(r: random.Random) -> str:
    a, b, c, d = (r.choice([i for i in range(-9, 10) if i]) for _ in range(4))
    # (a x + b)(c x + d) = ac x^2 + (ad + bc) x + bd
    p2, p1, p0 = a * c, a * d + b * c, b * d
    res = _signed(p2, "x^2", True) + (_signed(p1, "x") if p1 else "") + _signed(p0)
    return (f"Expand ({_signed(a, 'x', True)}{_signed(b)})({_signed(c, 'x', True)}{_signed(d)}).\n"
            f"Answer: {a*c}x^2 + {a*d}x + {b*c}x + {b*d} = {res}.")


def derivative(r: random.Random) -> str:
    terms = sorted({r.randint(0, 6) for _ in range(r.randint(2, 4))}, reverse=True)
    coef = {k: r.choice([i for i in range(-9, 10) if i]) for k in terms}

    def poly(cs):
        out = ""
        for k, c in cs.items():
            v = "" if k == 0 else "x" if k == 1 else f"x^{k}"
            out += _signed(c, v, first=not out) if v else (_signed(c, first=not out))
        return out or "0"

    d = {k - 1: c * k for k, c in coef.items() if k > 0}
    return f"Differentiate f(x) = {poly(coef)}.\nAnswer: Using the power rule term by term, f'(x) = {poly(d)}."


def gcd_lcm(r: random.Random) -> str:
    g = r.randint(2, 30)
    a, b = g * r.randint(2, 20), g * r.randint(2, 20)
    gg = gcd(a, b)
    return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.\n"
            f"Answer: gcd({a}, {b}) = {gg}, and lcm({a}, {b}) = {a} * {b} / {gg} = {a * b // gg}.")


def sequence(r: random.Random) -> str:
    a, d, n = r.randint(-20, 20), r.randint(-9, 12) or 3, r.randint(8, 60)
    first = ", ".join(str(a + i * d) for i in range(4))
    an = a + (n - 1) * d
    return (f"The arithmetic sequence {first}, ... has common difference {d}. What is its {n}th term, and the sum of "
            f"the first {n} terms?\nAnswer: a_{n} = {a} + ({n} - 1) * {d} = {an}; S_{n} = {n} * ({a} + {an}) / 2 = "
            f"{n * (a + an) // 2}.")


def word_problem(r: random.Random) -> str:
    name = r.choice(NAMES)
    item, items = r.choice(ITEMS)
    cont = r.choice(CONTAINERS)
    k, per, given = r.randint(2, 12), r.randint(3, 24), r.randint(1, 20)
    total = k * per
    if given >= total:
        given = total // 3
    kind = r.randrange(3)
    if kind == 0:
        return (f"{name} buys {k} {cont}{'es' if cont.endswith('x') else 's'} of {items} with {per} {items} in each "
                f"{cont}, then gives away {given} {items}. How many {items} does {name} have left?\n"
                f"Answer: {k} * {per} = {total} {items}; {total} - {given} = {total - given}.")
    if kind == 1:
        price, extra = r.randint(2, 40), r.randint(1, 50)
        paid = k * price + extra
        return (f"One {item} costs {price} dollars. How much do {k} {items} cost, and how much change does {name} get "
                f"from {paid} dollars?\n"
                f"Answer: {k} * {price} = {k * price} dollars; the change is {paid} - {k * price} = {extra} dollars.")
    speed, hours = r.randint(30, 120), r.randint(2, 9)
    return (f"{name} drives at {speed} km per hour for {hours} hours. How far does {name} travel?\n"
            f"Answer: distance = speed * time = {speed} * {hours} = {speed * hours} km.")


GENERATORS = [arithmetic, fractions, percent, linear, system2, expand, derivative, gcd_lcm, sequence, word_problem]


def problem(r: random.Random) -> str:
    return r.choice(GENERATORS)(r)


def document(r: random.Random, n: int | None = None) -> str:
    """A worksheet: several problems separated by blank lines."""
    n = n or r.randint(4, 12)
    return "\n\n".join(f"Problem {i + 1}. {problem(r)}" for i in range(n))


def corpus(seed: int, n_bytes: int) -> list[str]:
    r = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        doc = document(r)
        out.append(doc)
        size += len(doc) + 1
    return out

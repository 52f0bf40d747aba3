"""Prose out of documentation and book formats, as paragraphs separated by blank lines: reStructuredText,
Markdown, HTML (a page's <main>, or a whole page less its layout), Perl POD, OSIS (SWORD Bible modules),
hard-wrapped Project Gutenberg text and verse; and `chunks`, which cuts a long text at paragraph breaks.
Code, tables, navigation and markup are dropped. Used by the corpus sources (`corpus_sources`) and by
`scripts/build_corpus.py`, which rebuilds the corpora that ship in fastsae/data/.
"""

from __future__ import annotations

import html
import html.parser
import re

DOC_CHARS = 24_000  # long texts are cut at paragraph breaks into parts of about this size (~6K tokens)


def _clean_inline(line: str) -> str:
    """reST/Markdown inline markup -> plain text: roles, links, literals, emphasis."""
    line = re.sub(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)  # :func:`name <target>` -> name
    line = re.sub(r"`([^`<]+?)\s*<[^>]*>`_+", r"\1", line)  # `text <url>`_ -> text
    line = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)  # [text](url) -> text
    line = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", line)  # [text][ref] -> text
    line = line.replace("``", "").replace("`", "")
    line = re.sub(r"(\*\*|\*)(\S[^*]*?)\1", r"\2", line)
    return line.replace("|", "").strip()


def paragraphs(lines: list[str]) -> str:
    """Lines (blank = paragraph break) -> paragraphs joined by blank lines, each on one line."""
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            text = " ".join(cur)
            if len(text.split()) >= 4:  # a paragraph of prose, not a stray label
                paras.append(text)
            cur = []
    return "\n\n".join(paras)


def rst_prose(text: str) -> str:
    """The prose of a reStructuredText page: directives' bodies dedented, literal blocks, doctests,
    comments, tables and heading underlines dropped."""
    out: list[str] = []
    lines = text.splitlines()
    i, skip_indent = 0, None  # inside a block to drop while lines are indented deeper than skip_indent
    literal_next = False
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        i += 1
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if literal_next and stripped:
            literal_next = False
            if indent > 0:  # the indented literal block after "::"
                skip_indent = indent - 1
                continue
        if not stripped:
            out.append("")
            continue
        if re.fullmatch(r"([=\-~^\"'*#+.`:_])\1{2,}", stripped):  # heading over/underline
            out.append("")
            continue
        if stripped.startswith(".. "):
            directive = re.match(r"\.\. ([a-z:-]+)::", stripped)
            keep_body = directive and directive.group(1) in ("note", "versionadded", "versionchanged", "seealso",
                                                            "tip", "warning", "important", "deprecated",
                                                            "impl-detail", "attention", "caution")
            if not keep_body:
                is_api = directive and directive.group(1) in ("function", "method", "class", "attribute",
                                                              "data", "exception", "decorator", "module",
                                                              "describe", "opcode", "cmdoption", "envvar")
                if not is_api:  # code, index, comments, toctrees, tables, images, targets: drop the body
                    skip_indent = indent
            out.append("")
            continue
        if stripped.startswith((">>>", "...", "+--", "===", "|")) or re.match(r":[a-z -]+:( |$)", stripped):
            continue  # doctests, tables, field lists (:synopsis: ...)
        if stripped.endswith("::"):
            literal_next = True
            stripped = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
            if not stripped.strip(":"):
                continue
        out.append(_clean_inline(stripped))
    return paragraphs(out)


def markdown_prose(text: str) -> str:
    """The prose of a Markdown page: fenced code, HTML comments and tags, tables and headings' marks dropped."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    out, fenced = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        if fenced or stripped.startswith(("|", "<", "[")) or line.startswith("    "):
            out.append("" if not stripped else None)
            continue
        if stripped.startswith("#"):
            out.extend(["", _clean_inline(stripped.lstrip("#")), ""])
            continue
        out.append(_clean_inline(re.sub(r"^[*-] ", "", stripped)))
    return paragraphs([line for line in out if line is not None])


class _ParagraphParser(html.parser.HTMLParser):
    """An HTML parser that gathers text into self.cur and closes a paragraph into self.lines on _flush."""

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.cur)).strip()
        if text:
            self.lines.extend([text, ""])
        self.cur = []


class _HtmlProse(_ParagraphParser):
    """Text of <main>'s paragraphs, list items, headings and quotes; code blocks (<pre>) dropped."""

    BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "blockquote", "dd", "dt"}

    def __init__(self):
        super().__init__()
        self.in_main = self.in_pre = 0
        self.lines: list[str] = []
        self.cur: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main += 1
        elif tag == "pre":
            self.in_pre += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag == "main":
            self.in_main -= 1
        elif tag == "pre":
            self.in_pre -= 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        if self.in_main and not self.in_pre:
            self.cur.append(data)



def html_prose(text: str) -> str:
    """The prose of a page's <main> (the Rust book's layout)."""
    parser = _HtmlProse()
    parser.feed(text)
    parser._flush()
    return paragraphs(parser.lines)


class _PageProse(_ParagraphParser):
    """Text of a whole page's <body> in blocks, without code, tables, scripts, navigation or any element
    whose class or id is in `skip` (a page layout's headers, footers, menus and tables of contents)."""

    BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "h5", "blockquote", "dd", "dt", "div", "br", "td", "th", "tr"}
    DROP = {"pre", "script", "style", "table", "nav", "head", "code-block", "svg"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "area", "col", "wbr", "source"}

    def __init__(self, skip: frozenset[str]):
        super().__init__(convert_charrefs=True)
        self.skip = skip
        self.stack: list[tuple[str, bool]] = []  # open elements that can hold dropped content, and whether they do
        self.dropping = 0
        self.title = ""
        self.in_title = False
        self.lines: list[str] = []
        self.cur: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in self.BLOCKS:
            self._flush()
        if tag in self.VOID or tag in ("p", "li", "dd", "dt", "td", "th", "tr"):  # often left unclosed
            return
        attrs = dict(attrs)
        names = set((attrs.get("class") or "").split()) | {attrs.get("id") or ""}
        drop = tag in self.DROP or bool(names & self.skip)
        self.stack.append((tag, drop))
        self.dropping += drop

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.BLOCKS:
            self._flush()
        if any(t == tag for t, _ in self.stack):
            while self.stack:
                t, drop = self.stack.pop()
                self.dropping -= drop
                if t == tag:
                    break

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.dropping:
            self.cur.append(data)



def page_prose(text: str, skip: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(title, prose) of an HTML page: see _PageProse."""
    parser = _PageProse(skip)
    parser.feed(text)
    parser.close()
    parser._flush()
    return re.sub(r"\s+", " ", parser.title).strip(), paragraphs(parser.lines)


_POD_CODES = re.compile(r"[IBCFSXZL]<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)


def _pod_inline(text: str) -> str:
    for _ in range(3):  # nested codes, innermost first
        text = _POD_CODES.sub(lambda m: (m.group(1) if m.group(1) is not None else m.group(2)).split("|")[0], text)
    text = re.sub(r"E<([^<>]*)>", lambda m: {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(m.group(1), ""),
                  text)
    return text


def pod_prose(text: str) -> str:
    """The prose of a Perl POD page: verbatim (indented) paragraphs, =begin/=for blocks and commands dropped,
    headings and =item labels kept as paragraphs, formatting codes (B<>, C<>, L<text|target>) as text."""
    out, dropping = [], False
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        if para.startswith("=begin"):
            dropping = True
        if dropping:
            dropping = not para.startswith("=end")
            continue
        if para.startswith(("=head", "=item")):
            label = para.split(None, 1)[1] if len(para.split(None, 1)) > 1 else ""
            out.extend(["", _pod_inline(label), ""])
            continue
        if para.startswith("=") or para[:1] in (" ", "\t"):  # other commands; verbatim (code) paragraphs
            continue
        out.extend(_pod_inline(para).splitlines() + [""])
    return paragraphs(out)


def unwrap(text: str) -> str:
    """Hard-wrapped prose (a Project Gutenberg text) -> one line per paragraph, paragraphs split by blank lines."""
    paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")))
    return "\n\n".join(p for p in paras if p)


def stanzas(text: str) -> str:
    """Verse: lines kept, blank-line runs (stanza breaks) collapsed to one."""
    blocks = ("\n".join(line.strip() for line in b.splitlines() if line.strip())
              for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")))
    return "\n\n".join(b for b in blocks if b)


def chunks(text: str, size: int = DOC_CHARS) -> list[str]:
    """text cut at paragraph breaks into about len(text) / size parts of near-equal length (one if short)."""
    n = max(1, round(len(text) / size))
    if n == 1:
        return [text]
    paras, parts, cur, cur_len = text.split("\n\n"), [], [], 0
    target = len(text) / n
    for para in paras:
        cur.append(para)
        cur_len += len(para) + 2
        if cur_len >= target and len(parts) < n - 1:
            parts.append("\n\n".join(cur))
            cur, cur_len = [], 0
    if cur:
        parts.append("\n\n".join(cur))
    return parts


def osis_prose(osis: str) -> str:
    """OSIS markup -> paragraphs: notes dropped, titles and paragraphs (x-p divisions) as paragraphs, poetry
    lines on their own lines, every other tag removed."""
    osis = re.sub(r"<note\b[^>]*/>|<note\b.*?</note>", " ", osis, flags=re.S)
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.S)
    osis = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>|<lg\b[^>]*/?>|</lg>', "\n\n", osis)
    osis = re.sub(r"<l\b[^>]*/?>|</l>", "\n", osis)
    text = html.unescape(re.sub(r"<[^>]+>", "", osis))
    paras = (re.sub(r"[ \t]+", " ", "\n".join(line.strip() for line in p.splitlines() if line.strip()))
             for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if len(p.split()) >= 2)

"""Render sandbox channels as a static HTML page that looks like a Discord channel.

Used by ``make demo`` so a person can see what the bot did without a Discord account: messages
with author and time, basic markdown, embeds with their colour bar and fields, images (written
next to ``index.html``), buttons drawn with their style/emoji/label, and ephemeral messages
marked "Only you can see this".
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import Message, StoredFile

if TYPE_CHECKING:
    from .server import Sandbox

BUTTON_STYLES = {1: "primary", 2: "secondary", 3: "success", 4: "danger", 5: "link", 6: "premium"}
AVATAR_COLOURS = ["#5865f2", "#3ba55c", "#faa61a", "#ed4245", "#eb459e", "#9b59b6", "#1abc9c"]
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Bare links (not inside a masked link or an attribute); Discord message links become pills.
MESSAGE_LINK = re.compile(r"(?<![\w('\"=>])https://(?:\w+\.)?discord(?:app)?\.com/channels/(\d+|@me)/(\d+)/(\d+)")
BARE_URL = re.compile(r"(?<![\w('\"=>])(https?://[^\s<'\"]+)")

CSS = """
body{margin:0;background:#313338;color:#dbdee1;
  font:15px/1.375 "gg sans","Noto Sans","Helvetica Neue",Arial,sans-serif}
header{background:#2b2d31;padding:12px 20px;font-weight:600;color:#f2f3f5;border-bottom:1px solid #1f2023}
h2{margin:0;padding:14px 20px 6px;color:#f2f3f5;font-size:16px;border-top:1px solid #3f4147}
h2 .hash{color:#80848e;margin-right:4px}
.nsfw{font-size:11px;background:#da373c;color:#fff;border-radius:3px;padding:1px 4px;margin-left:6px}
.msg{display:flex;padding:6px 20px;gap:14px}
.msg:hover{background:#2e3035}
.msg.ephemeral{background:rgba(88,101,242,.07)}
.avatar{flex:0 0 40px;height:40px;border-radius:50%;color:#fff;font-weight:700;display:flex;
  align-items:center;justify-content:center;font-size:18px}
.body{min-width:0;flex:1}
.meta{display:flex;gap:8px;align-items:baseline}
.author{color:#f2f3f5;font-weight:600}
.tag{background:#5865f2;color:#fff;font-size:10px;border-radius:3px;padding:1px 4px;font-weight:600}
.time{color:#949ba4;font-size:12px}
.edited{color:#949ba4;font-size:10px}
.context{color:#949ba4;font-size:13px;margin-bottom:2px}
.context b{color:#c9cdfb;font-weight:500}
.content{white-space:normal;word-wrap:break-word}
.content code{background:#2b2d31;border-radius:3px;padding:0 3px;font-size:85%}
.content pre{background:#2b2d31;border:1px solid #1e1f22;border-radius:4px;padding:8px;white-space:pre-wrap}
.content blockquote{margin:0;border-left:4px solid #4e5058;padding-left:10px}
.mention{background:rgba(88,101,242,.3);color:#c9cdfb;border-radius:3px;padding:0 2px}
.thinking{color:#949ba4;font-style:italic}
.embed{display:flex;max-width:520px;background:#2b2d31;border-radius:4px;margin-top:6px;overflow:hidden}
.embed .bar{flex:0 0 4px}
.embed .inner{padding:8px 16px 12px 12px;min-width:0;flex:1}
.embed .eauthor{font-size:13px;font-weight:600;color:#f2f3f5;margin-top:4px}
.embed .title{font-weight:600;color:#f2f3f5;margin-top:4px}
.embed .title a{color:#00a8fc;text-decoration:none}
.embed .desc{font-size:14px;margin-top:4px}
.fields{display:grid;grid-template-columns:repeat(3,1fr);gap:8px;margin-top:8px}
.field{grid-column:1/-1;font-size:14px}
.field.inline{grid-column:auto}
.field .fname{font-weight:600;color:#f2f3f5}
.embed .footer{font-size:12px;color:#b5bac1;margin-top:8px}
.embed img.eimg{max-width:100%;border-radius:4px;margin-top:12px}
.embed img.thumb{float:right;max-width:80px;max-height:80px;border-radius:4px;margin-left:12px}
.attachments{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}
.attachments img{max-width:400px;max-height:400px;border-radius:6px;display:block}
.attachments.grid{display:grid;grid-template-columns:repeat(2,260px);gap:4px}
.attachments.grid img{width:260px;height:260px;object-fit:cover;border-radius:4px}
.msglink{background:rgba(88,101,242,.3);color:#c9cdfb;border-radius:3px;padding:0 3px;text-decoration:none}
.content a.url{color:#00a8fc;text-decoration:none}
.was{border-left:3px solid #4e5058;padding-left:8px;margin-top:4px;color:#949ba4;font-size:13px}
.was .content code{font-size:90%}
.history{color:#949ba4;font-size:12px;margin-top:2px}
.history summary{cursor:pointer}
.history ol{margin:4px 0 0;padding-left:20px}
.file{background:#2b2d31;border:1px solid #1e1f22;border-radius:6px;padding:10px 12px}
.file a{color:#00a8fc}
.row{display:flex;gap:8px;flex-wrap:wrap;margin-top:6px}
.btn{display:inline-flex;align-items:center;gap:6px;border-radius:4px;padding:2px 16px;height:32px;
  font-size:14px;font-weight:500;color:#fff;border:0}
.btn.primary{background:#5865f2}
.btn.secondary,.btn.link{background:#4e5058}
.btn.success{background:#248046}
.btn.danger{background:#da373c}
.btn.premium{background:#5865f2}
.btn.disabled{opacity:.5}
.select{background:#1e1f22;border-radius:4px;padding:8px 12px;min-width:300px;color:#949ba4}
.container{border-left:4px solid #4e5058;background:#2b2d31;border-radius:6px;padding:12px;margin-top:6px;
  max-width:520px}
.eph{font-size:12px;color:#949ba4;margin-top:4px}
.eph a{color:#00a8fc}
.reply{font-size:13px;color:#b5bac1;margin-bottom:2px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;
  max-width:720px}
.reply b{color:#f2f3f5;font-weight:500}
"""


def write_transcript(
    sandbox: Sandbox,
    channel_ids: Iterable[Any] | None,
    out_dir: str | Path,
    *,
    title: str = "Atelier — sandbox transcript",
) -> Path:
    """Write ``index.html`` and every image/file attachment into ``out_dir``; return the page path.

    ``channel_ids``: channels (objects or ids) in display order; None means every channel that
    has messages.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderer = _Renderer(sandbox, out)
    if channel_ids is None:
        ids = [cid for cid, msgs in sandbox.world.channel_message_ids.items() if msgs]
    else:
        ids = [int(getattr(c, "id", c)) for c in channel_ids]
    sections = [renderer.channel(cid) for cid in ids]
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header>{html.escape(title)}</header>{''.join(sections)}</body></html>"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


class _Renderer:
    def __init__(self, sandbox: Sandbox, out: Path) -> None:
        self.sb = sandbox
        self.world = sandbox.world
        self.out = out
        self.local: dict[str, str] = {}  # CDN url -> file name next to index.html

    # -- structure ------------------------------------------------------------------------
    def channel(self, channel_id: int) -> str:
        chan = self.world.channels.get(channel_id)
        if chan is None:
            return ""
        if chan.is_dm:
            who = chan.recipients[0].display_name if chan.recipients else "?"
            head = f"<h2>@ {html.escape(who)} <span class=time>(direct messages)</span></h2>"
        else:
            nsfw = "<span class=nsfw>AGE-RESTRICTED</span>" if chan.nsfw else ""
            head = f"<h2><span class=hash>#</span>{html.escape(chan.name or '')}{nsfw}</h2>"
        body = "".join(self.message(m) for m in self.world.channel_messages(channel_id))
        return f"<section>{head}{body}</section>"

    def message(self, msg: Message) -> str:
        author = msg.author
        colour = AVATAR_COLOURS[author.id % len(AVATAR_COLOURS)]
        initial = html.escape((author.display_name or "?")[0].upper())
        tag = "<span class=tag>APP</span>" if author.bot else ""
        edited = (
            f"<span class=edited title='{len(msg.history)} earlier version(s)'>(edited)</span>" if msg.edited_at else ""
        )
        parts = [
            self.context(msg),
            "<div class=meta>",
            f"<span class=author>{html.escape(author.display_name)}</span>{tag}",
            f"<span class=time>{msg.created_at.strftime('%Y-%m-%d %H:%M:%S')}</span>{edited}</div>",
        ]
        if msg.loading:
            parts.append(f"<div class=thinking>{html.escape(author.display_name)} is thinking…</div>")
        if msg.content:
            parts.append(f"<div class=content>{self.markdown(msg.content)}</div>")
        parts += [self.embed(e) for e in msg.embeds]
        parts.append(self.attachments(msg))
        parts.append(self.components(msg.components))
        parts.append(self.history(msg))
        if msg.ephemeral:
            viewer = self.world.users.get(msg.visible_to or 0)
            who = f" ({html.escape(viewer.display_name)})" if viewer else ""
            parts.append(f"<div class=eph>👁 Only you can see this{who} · <a>Dismiss message</a></div>")
        cls = "msg ephemeral" if msg.ephemeral else "msg"
        return (
            f"<div class='{cls}' id=m{msg.id}><div class=avatar style='background:{colour}'>{initial}</div>"
            f"<div class=body>{''.join(parts)}</div></div>"
        )

    def history(self, msg: Message) -> str:
        """Earlier versions of an edited message (e.g. a queue card that became progress, then
        "Done"): the first version in full, the ones in between folded. Discord shows only the
        latest, but a transcript is read after the fact."""
        versions = [v for v in msg.history if v.content]
        if not versions:
            return ""
        first, between = versions[0], versions[1:]
        out = (
            f"<div class=was><span class=time>first posted {first.at.strftime('%H:%M:%S')}:</span>"
            f"<div class=content>{self.markdown(first.content)}</div></div>"
        )
        if between:
            items = "".join(
                f"<li><span class=time>{v.at.strftime('%H:%M:%S')}</span> "
                f"{self.markdown(v.content.replace(chr(10), ' · '))}</li>"
                for v in between
            )
            summary = f"{len(between)} edit(s) in between"
            out += f"<details class=history><summary>{summary}</summary><ol>{items}</ol></details>"
        return out

    def context(self, msg: Message) -> str:
        if msg.reference is not None:
            ref = self.world.messages.get(int(msg.reference["message_id"]))
            if ref is not None:
                # one line, cut by CSS (an ellipsis) so markup and links stay whole
                snippet = self.markdown(ref.content.split("\n", 1)[0]) or "<i>Click to see attachment</i>"
                return f"<div class=reply>↪ <b>@{html.escape(ref.author.display_name)}</b> {snippet}</div>"
        meta = msg.interaction_meta
        if meta and meta.get("name"):
            user = html.escape(meta["user"].get("global_name") or meta["user"]["username"])
            return f"<div class=context><b>{user}</b> used <b>/{html.escape(meta['name'])}</b></div>"
        return ""

    # -- pieces ---------------------------------------------------------------------------
    def embed(self, embed: dict[str, Any]) -> str:
        colour = embed.get("color")
        bar = f"#{colour:06x}" if isinstance(colour, int) else "#1e1f22"
        inner: list[str] = []
        thumb = (embed.get("thumbnail") or {}).get("url")
        if thumb:
            inner.append(f"<img class=thumb src='{html.escape(self.image_src(thumb))}' alt=''>")
        author = (embed.get("author") or {}).get("name")
        if author:
            inner.append(f"<div class=eauthor>{html.escape(author)}</div>")
        if embed.get("title"):
            text = html.escape(embed["title"])
            if embed.get("url"):
                text = f"<a href='{html.escape(embed['url'])}'>{text}</a>"
            inner.append(f"<div class=title>{text}</div>")
        if embed.get("description"):
            inner.append(f"<div class=desc>{self.markdown(embed['description'])}</div>")
        fields = embed.get("fields") or []
        if fields:
            cells = "".join(
                f"<div class='field{' inline' if f.get('inline') else ''}'>"
                f"<div class=fname>{self.markdown(str(f.get('name', '')))}</div>"
                f"<div>{self.markdown(str(f.get('value', '')))}</div></div>"
                for f in fields
            )
            inner.append(f"<div class=fields>{cells}</div>")
        image = (embed.get("image") or {}).get("url")
        if image:
            src = html.escape(self.image_src(image))
            inner.append(f"<a href='{src}'><img class=eimg src='{src}' alt=''></a>")
        footer = (embed.get("footer") or {}).get("text")
        stamp = embed.get("timestamp")
        if footer or stamp:
            text = " • ".join(html.escape(str(x)) for x in (footer, stamp) if x)
            inner.append(f"<div class=footer>{text}</div>")
        return (
            f"<div class=embed><div class=bar style='background:{bar}'></div>"
            f"<div class=inner>{''.join(inner)}</div></div>"
        )

    def attachments(self, msg: Message) -> str:
        if not msg.attachments:
            return ""
        # An attachment an embed shows (as its image or thumbnail) is not shown again below it.
        embedded = {str((e.get(key) or {}).get("url")) for e in msg.embeds for key in ("image", "thumbnail")}
        shown = [att for att in msg.attachments if att.is_image and att.url not in embedded]
        grid = len(shown) > 1  # several images: Discord's mosaic of cropped squares
        items = []
        for att in msg.attachments:
            name = self.save(att)
            if att.url in embedded:
                continue  # Discord hides attachments that an embed already shows
            if att.is_image:
                size = "" if grid else f"width={att.width} height={att.height} style='width:auto;height:auto'"
                items.append(
                    f"<a href='{html.escape(name)}'><img src='{html.escape(name)}' "
                    f"alt='{html.escape(att.filename)}' {size}></a>"
                )
            else:
                items.append(
                    f"<div class=file>📄 <a href='{html.escape(name)}'>{html.escape(att.filename)}</a> "
                    f"<span class=time>{att.size} bytes</span></div>"
                )
        cls = "attachments grid" if grid else "attachments"
        return f"<div class='{cls}'>{''.join(items)}</div>" if items else ""

    def components(self, components: list[dict[str, Any]]) -> str:
        out = []
        for comp in components:
            kind = comp.get("type")
            if kind == 1:
                out.append(f"<div class=row>{''.join(self.component(c) for c in comp.get('components') or [])}</div>")
            elif kind == 10:
                out.append(f"<div class=content>{self.markdown(str(comp.get('content', '')))}</div>")
            elif kind == 17:
                out.append(f"<div class=container>{self.components(comp.get('components') or [])}</div>")
            elif kind == 9:
                out.append(self.components(comp.get("components") or []))
                if isinstance(comp.get("accessory"), dict):
                    out.append(f"<div class=row>{self.component(comp['accessory'])}</div>")
            elif kind == 12:
                imgs = "".join(
                    f"<img src='{html.escape(self.image_src((i.get('media') or {}).get('url', '')))}' alt=''>"
                    for i in comp.get("items") or []
                )
                out.append(f"<div class=attachments>{imgs}</div>")
            elif kind == 14:
                out.append("<hr style='border-color:#3f4147'>")
            else:
                out.append(f"<div class=row>{self.component(comp)}</div>")
        return "".join(out)

    def component(self, comp: dict[str, Any]) -> str:
        kind = comp.get("type")
        if kind == 2:
            style = BUTTON_STYLES.get(comp.get("style", 2), "secondary")
            disabled = " disabled" if comp.get("disabled") else ""
            emoji = self.emoji(comp.get("emoji"))
            label = html.escape(comp.get("label") or "")
            arrow = " ↗" if style == "link" else ""
            return f"<span class='btn {style}{disabled}'>{emoji}{label}{arrow}</span>"
        if kind in (3, 5, 6, 7, 8):
            placeholder = html.escape(comp.get("placeholder") or "Make a selection")
            return f"<span class=select>{placeholder} ▾</span>"
        if kind == 11:
            src = self.image_src((comp.get("media") or {}).get("url", ""))
            return f"<img class=thumb src='{html.escape(src)}' alt=''>"
        return ""

    @staticmethod
    def emoji(emoji: dict[str, Any] | None) -> str:
        if not emoji:
            return ""
        if emoji.get("id"):
            return f"<span>:{html.escape(emoji.get('name') or 'emoji')}:</span>"
        return f"<span>{html.escape(emoji.get('name') or '')}</span>"

    # -- files ----------------------------------------------------------------------------
    def save(self, att: StoredFile) -> str:
        if att.url in self.local:
            return self.local[att.url]
        name = f"{att.id}-{SAFE_NAME.sub('_', att.filename)}"
        (self.out / name).write_bytes(att.data)
        self.local[att.url] = name
        return name

    def image_src(self, url: str) -> str:
        if url in self.local:
            return self.local[url]
        for stored in self.world.files.values():
            if url in (stored.url, stored.proxy_url):
                return self.save(stored)
        return url

    # -- markdown -------------------------------------------------------------------------
    def markdown(self, text: str) -> str:
        """Escape, then render the Discord markdown subset people actually use."""
        blocks: list[str] = []

        def keep_block(m: re.Match[str]) -> str:
            blocks.append(f"<pre>{m.group(1).strip()}</pre>")
            return f"\x00{len(blocks) - 1}\x00"

        out = html.escape(text, quote=False)
        out = re.sub(r"```(?:[a-z0-9]+\n)?(.*?)```", keep_block, out, flags=re.S)
        out = re.sub(r"`([^`\n]+)`", r"<code>\1</code>", out)
        out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
        out = re.sub(r"__(.+?)__", r"<u>\1</u>", out)
        out = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", out)
        out = re.sub(r"(?<!\w)_(?!\s)(.+?)(?<!\s)_(?!\w)", r"<i>\1</i>", out)
        out = re.sub(r"~~(.+?)~~", r"<s>\1</s>", out)
        out = re.sub(r"\|\|(.+?)\|\|", r"<span style='background:#1e1f22'>\1</span>", out)
        out = MESSAGE_LINK.sub(lambda m: self.message_link(int(m.group(2)), int(m.group(3))), out)
        out = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r"<a href='\2' style='color:#00a8fc'>\1</a>", out)
        out = BARE_URL.sub(r"<a class=url href='\1'>\1</a>", out)
        out = re.sub(r"&lt;@!?(\d+)&gt;", lambda m: self.mention_user(int(m.group(1))), out)
        out = re.sub(r"&lt;@&amp;(\d+)&gt;", lambda m: self.mention_role(int(m.group(1))), out)
        out = re.sub(r"&lt;#(\d+)&gt;", lambda m: self.mention_channel(int(m.group(1))), out)
        out = re.sub(r"&lt;a?:(\w+):\d+&gt;", r":\1:", out)
        out = re.sub(r"&lt;t:(\d+)(?::\w)?&gt;", lambda m: _timestamp(int(m.group(1))), out)
        lines = []
        for line in out.split("\n"):
            if line.startswith("&gt; "):
                line = f"<blockquote>{line[5:]}</blockquote>"
            elif line.startswith("# "):
                line = f"<b style='font-size:20px'>{line[2:]}</b>"
            elif line.startswith("-# "):
                line = f"<span class=time>{line[3:]}</span>"
            lines.append(line)
        out = "<br>".join(lines).replace("</blockquote><br>", "</blockquote>")
        return re.sub(r"\x00(\d+)\x00", lambda m: blocks[int(m.group(1))], out)

    def message_link(self, channel_id: int, message_id: int) -> str:
        """A link to a Discord message, drawn as Discord does (a pill), pointing into this page."""
        chan = self.world.channels.get(channel_id)
        name = html.escape(chan.name or "" if chan else "unknown")
        return f"<a class=msglink href='#m{message_id}'>#{name} › message</a>"

    def mention_user(self, user_id: int) -> str:
        user = self.world.users.get(user_id)
        return f"<span class=mention>@{html.escape(user.display_name if user else 'unknown-user')}</span>"

    def mention_role(self, role_id: int) -> str:
        for guild in self.world.guilds.values():
            if role_id in guild.roles:
                return f"<span class=mention>@{html.escape(guild.roles[role_id].name)}</span>"
        return "<span class=mention>@deleted-role</span>"

    def mention_channel(self, channel_id: int) -> str:
        chan = self.world.channels.get(channel_id)
        return f"<span class=mention>#{html.escape(chan.name or '' if chan else 'unknown')}</span>"


def _timestamp(epoch: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

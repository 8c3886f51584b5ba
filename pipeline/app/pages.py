"""The app's HTML: the upload form (with a message when an upload was refused) and a result page.

Pages are self-contained (inline CSS and a few lines of script, no request leaves the machine).
Every text that comes from a file or a model is escaped.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from pipeline.app.catalogue import ALL, Catalogue
from pipeline.app.compare import Comparison, ModelResult
from pipeline.app.render import agreement_colours, legend_css
from pipeline.core.channels import L4S_CHANNELS
from pipeline.report.rasters import PROBABILITY_RAMP, css_gradient

TITLE = "Landslide model comparison"
UNITS_CHOICES = (("", "as the file says (its UNITS tag; physical without one)"),
                 ("physical", "physical: reflectance 0-1, degrees, metres"),
                 ("dn", "digital numbers: reflectance x 10000"),
                 ("l4s", "Landslide4Sense scaling"))
LEVEL_CHOICES = (("L1C", "L1C: top of atmosphere (as Landslide4Sense)"), ("L2A", "L2A: surface reflectance"))

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2rem 1.6rem;color:#1d1d1f;background:#fafafa}
h1{font-size:1.35rem;margin:0 0 .5rem}h2{font-size:1.1rem;margin:.2rem 0}
.muted{color:#666}.error{background:#fde8e8;border:1px solid #d33;color:#8a1111;padding:.7rem 1rem;
border-radius:6px;margin:.8rem 0;white-space:pre-wrap}.notice{background:#fff6dd;border:1px solid #d9a300;
padding:.5rem .9rem;border-radius:6px;margin:.5rem 0}
form.upload{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1rem;display:grid;
grid-template-columns:max-content 1fr;gap:.6rem 1rem;align-items:center;max-width:60rem}
form.upload button{grid-column:2;justify-self:start;padding:.4rem 1.2rem;font-size:1rem}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
.panels{display:flex;flex-wrap:wrap;gap:.8rem;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem}
figure img{display:block;width:232px;height:auto;image-rendering:pixelated;background:
repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 0 0/16px 16px}
figcaption{font-size:.78rem;color:#444;max-width:232px;margin-top:.3rem;line-height:1.5}
.top{display:flex;flex-wrap:wrap;gap:.8rem;align-items:flex-start;margin:.4rem 0 .8rem}
section.model,section.agreement{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:.6rem;
display:flex;flex-wrap:wrap;gap:.8rem;align-items:flex-start}section.model{margin:.6rem 0}
section.model .info{width:250px;font-size:.9rem}section.model .info p{margin:.3rem 0}
ul.downloads{padding-left:1.1rem;margin:.3rem 0;font-size:.85rem}.small{font-size:.8rem;font-weight:normal}
.ramp{display:inline-block;height:9px;width:110px;border:1px solid #aaa;vertical-align:middle}
.swatch{display:inline-block;width:13px;height:13px;border:1px solid #999;vertical-align:middle;margin:0 .2rem 0 .5rem}
table.meta{font-size:.85rem;max-width:330px}table.iou{font-size:.85rem}caption{font-size:.8rem;color:#555;
caption-side:bottom;text-align:left;padding-top:.3rem;max-width:360px}
.meta td:first-child{color:#555}
"""

_SCRIPT = """
const form = document.getElementById('upload');
form.addEventListener('submit', (ev) => {
  const file = form.elements['file'].files[0];
  const max = Number(form.dataset.maxBytes);
  const box = document.getElementById('client-error');
  if (file && file.size > max) {
    ev.preventDefault();
    box.textContent = file.name + ' is ' + (file.size / 1048576).toFixed(1) +
      ' MB, more than this server takes (' + (max / 1048576).toFixed(0) + ' MB; see --max-upload-mb)';
    box.hidden = false;
    return;
  }
  box.hidden = true;
  form.querySelector('button').disabled = true;
  document.getElementById('running').hidden = false;
});
"""


def _page(title: str, body: str) -> bytes:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body>{body}</body></html>\n").encode()


def _options(choices: tuple[tuple[str, str], ...] | list[tuple[str, str]], selected: str) -> str:
    return "".join(f'<option value="{escape(v)}"{" selected" if v == selected else ""}>{escape(t)}</option>'
                   for v, t in choices)


def upload_form(catalogue: Catalogue, max_bytes: int, *, error: str | None = None,
                fields: dict[str, str] | None = None, keep: int = 20) -> bytes:
    """The start page: the form, the models on offer, and ``error`` when an upload was refused."""
    fields = fields or {}
    models = [(ALL, f"all {len(catalogue)} models")] + [(e.id, e.name) for e in catalogue.entries]
    error_html = f'<div class="error" id="error" role="alert">{escape(error)}</div>' if error else ""
    rows = "".join(
        f"<tr><td>{escape(e.name)}</td><td>{escape(', '.join(e.channels))}</td><td>{e.threshold:.3f}</td>"
        f"<td>{e.artefact.tile_size} px</td><td>{'shipped' if e.shipped else escape(str(e.artefact.path))}</td></tr>"
        for e in catalogue.entries)
    body = f"""<h1>{TITLE}</h1>
<p>Upload a Landslide4Sense <code>.h5</code> patch (128 x 128 x 14, the dataset's scaling, channels
{escape(', '.join(L4S_CHANNELS))}) or a GeoTIFF chip of any size (bands named in their descriptions,
or the 14 Landslide4Sense channels in order). Larger chips are cut into windows and stitched as scenes are.</p>
{error_html}<div class="error" id="client-error" role="alert" hidden></div>
<form class="upload" id="upload" method="post" action="/upload" enctype="multipart/form-data"
 data-max-bytes="{int(max_bytes)}">
<label for="file">Patch or chip</label><input type="file" id="file" name="file" accept=".h5,.hdf5,.tif,.tiff" required>
<label for="model">Model</label><select id="model" name="model">{_options(models, fields.get("model", ALL))}</select>
<label for="units">Units (GeoTIFF)</label><select id="units" name="units">{_options(UNITS_CHOICES, fields.get("units", ""))}</select>
<label for="level">Processing level</label><select id="level" name="level">{_options(LEVEL_CHOICES, fields.get("level", "L1C"))}</select>
<button type="submit">Compare</button>
</form>
<p id="running" class="muted" hidden>Running the models&hellip;</p>
<h2>Models</h2>
<table><tr><th>name</th><th>channels</th><th>threshold</th><th>window</th><th>file</th></tr>{rows}</table>
<p class="muted">Uploads up to {max_bytes / 1048576:.0f} MB. The results of the last {int(keep)} uploads stay in memory.</p>
<script>{_SCRIPT}</script>"""
    return _page(TITLE, body)


def _figure(src: str, caption: str, alt: str) -> str:
    return (f'<figure><img src="{escape(src)}" alt="{escape(alt)}" loading="eager">'
            f"<figcaption>{caption}</figcaption></figure>")


def result_url(comparison: Comparison, name: str = "") -> str:
    return f"/result/{quote(comparison.id)}" + (f"/{quote(name)}" if name else "")


def _meta(comparison: Comparison) -> str:
    s = comparison.source
    georef = (escape(f"{s.crs.to_string()}; downloads carry it") if s.georeferenced  # type: ignore[union-attr]
              else "none (downloads are not georeferenced)")
    rows = [("kind", escape(s.kind)), ("size", f"{s.shape[0]} x {s.shape[1]} px"),
            ("channels", escape(", ".join(s.channels))), ("stored units", escape(s.units)),
            ("processing level", escape(s.level or "-")), ("georeference", georef)]
    return '<table class="meta">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _rgb_figure(comparison: Comparison) -> str:
    caption = ("true colour: B04, B03, B02 stretched between their 2nd and 98th percentiles"
               if comparison.rgb is not None else "no true colour: the upload lacks B04, B03 or B02")
    return _figure(result_url(comparison, "rgb.png"), caption, "true colour")


def _model_section(comparison: Comparison, r: ModelResult) -> str:
    mid = r.entry.id
    link = lambda n, t: f'<a href="{escape(result_url(comparison, f"{mid}-{n}"))}" download>{t}</a>'  # noqa: E731
    panels = "".join([
        _figure(result_url(comparison, f"{mid}-probability.png"),
                f'probability 0 <span class="ramp" style="background:{css_gradient(PROBABILITY_RAMP)}"></span> 1',
                f"{r.entry.name} probability"),
        _figure(result_url(comparison, f"{mid}-mask.png"), f"mask: probability &ge; {r.threshold:.3f}",
                f"{r.entry.name} mask"),
        _figure(result_url(comparison, f"{mid}-overlay.png"), "mask on the true colour", f"{r.entry.name} overlay"),
    ])
    downloads = "".join(f"<li>{link(n, t)}</li>" for n, t in (
        ("probability.npy", "probability .npy (float32)"), ("probability.tif", "probability GeoTIFF"),
        ("mask.npy", "mask .npy (uint8)"), ("mask.tif", "mask GeoTIFF")))
    return (f'<section class="model" id="model-{escape(mid)}" data-model="{escape(mid)}"><div class="info">'
            f"<h2>{escape(r.entry.name)}</h2><p>threshold {r.threshold:.3f}<br>"
            f"<b>{100 * r.landslide_fraction:.2f} %</b> of the valid pixels flagged</p>"
            f'<p class="muted small">channels {escape(", ".join(r.entry.channels))}</p>'
            f'<ul class="downloads">{downloads}</ul></div>{panels}</section>')


def _iou_table(comparison: Comparison) -> str:
    """The pairwise IoU matrix; columns by the models' numbers (their rows name them)."""
    results = comparison.results
    head = "".join(f'<th title="{escape(r.entry.name)}">{k}</th>' for k, r in enumerate(results, start=1))
    rows = []
    for k, a in enumerate(results, start=1):
        cells = []
        for b in results:
            value = 1.0 if a is b else comparison.iou.get((a.entry.id, b.entry.id), comparison.iou.get(
                (b.entry.id, a.entry.id)))
            cells.append("<td>-</td>" if value is None else f"<td>{value:.3f}</td>")
        rows.append(f"<tr><th>{k}. {escape(a.entry.name)}</th>{''.join(cells)}</tr>")
    return (f'<table class="iou"><caption>intersection over union of the masks, per pair of models (- when '
            f"neither flags a pixel)</caption><tr><th>model</th>{head}</tr>{''.join(rows)}</table>")


def _agreement_section(comparison: Comparison) -> str:
    n = len(comparison.results)
    legend = "".join(f'<span class="swatch" style="background:{c}"></span>{k}'
                     for k, c in enumerate(legend_css(agreement_colours(n))))
    figure = _figure(result_url(comparison, "agreement.png"), f"models that flag each pixel:<br>{legend}",
                     "agreement between models")
    return (f'<section class="agreement" id="agreement">{figure}<div><h2>Agreement between the {n} models</h2>'
            f"{_iou_table(comparison)}</div></section>")


def result_page(comparison: Comparison) -> bytes:
    """The page of one comparison: the upload's facts and true colour, the models' agreement, and
    each model's probability, mask, overlay and downloads side by side."""
    notices = "".join(f'<div class="notice">{escape(name)} was not run: {escape(why)}</div>'
                      for name, why in comparison.skipped)
    agreement = _agreement_section(comparison) if len(comparison.results) > 1 else (
        '<p class="muted">One model ran: choose all models to see how they agree.</p>')
    sections = "".join(_model_section(comparison, r) for r in comparison.results)
    body = (f'<h1>{TITLE}: {escape(comparison.source.filename)} <a class="small" href="/">compare another file</a>'
            f'</h1>{notices}<div class="top">{_meta(comparison)}{_rgb_figure(comparison)}{agreement}</div>{sections}')
    return _page(f"{comparison.source.filename} - {TITLE}", body)


def message_page(title: str, message: str) -> bytes:
    """A short page for a missing result or another problem outside the form."""
    return _page(title, f'<h1>{escape(title)}</h1><div class="error" role="alert">{escape(message)}</div>'
                        '<p><a href="/">back to the upload form</a></p>')

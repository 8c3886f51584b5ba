/* The map of a landslide report page (pipeline.report): Leaflet in L.CRS.Simple, the map's
 * coordinates being the grid's own (a scene: its projected CRS) or plain equirectangular degrees
 * (a region). Everything it shows comes from the JSON in #report-data; it makes no request. */
(function () {
  "use strict";
  var holder = document.getElementById("report-data");
  var el = document.getElementById("map");
  if (!holder || !el || typeof L === "undefined") { return; }
  var data = JSON.parse(holder.textContent);
  var m = data.map;
  if (!m) { el.parentNode.removeChild(el); return; }

  function rgb(hex) {
    return [parseInt(hex.slice(1, 3), 16), parseInt(hex.slice(3, 5), 16), parseInt(hex.slice(5, 7), 16)];
  }
  function ramp(stops, t) {
    if (!(t >= 0)) { t = 0; }
    if (t > 1) { t = 1; }
    for (var i = 1; i < stops.length; i++) {
      if (t <= stops[i][0] || i === stops.length - 1) {
        var a = stops[i - 1], b = stops[i];
        var u = b[0] > a[0] ? (t - a[0]) / (b[0] - a[0]) : 0;
        u = Math.max(0, Math.min(1, u));
        var ca = rgb(a[1]), cb = rgb(b[1]);
        var c = [0, 1, 2].map(function (k) { return Math.round(ca[k] + (cb[k] - ca[k]) * u); });
        return "rgb(" + c.join(",") + ")";
      }
    }
    return stops[0][1];
  }
  function text(v) {
    if (v === null || v === undefined) { return "\u2014"; }
    if (typeof v === "number") {
      var a = Math.abs(v);
      if (Number.isInteger(v)) { return String(v); }
      return a >= 1000 ? v.toFixed(1) : a >= 1 ? String(+v.toFixed(4)) : String(+v.toPrecision(4));
    }
    return String(v);
  }
  function table(pairs) {
    var t = L.DomUtil.create("table", "attrs");
    pairs.forEach(function (p) {
      var tr = L.DomUtil.create("tr", "", t);
      var th = L.DomUtil.create("th", "", tr);
      th.textContent = p[0];
      var td = L.DomUtil.create("td", "", tr);
      td.textContent = text(p[1]);
    });
    return t;
  }

  var unitM = m.unit_m;
  var crs = L.extend({}, L.CRS.Simple, {
    distance: function (a, b) {
      var dx = b.lng - a.lng, dy = b.lat - a.lat;
      return Math.sqrt(dx * dx + dy * dy) * (unitM || 1);
    }
  });
  var map = L.map(el, {
    crs: crs, minZoom: -40, maxZoom: 40, zoomSnap: 0.25, zoomDelta: 0.5,
    attributionControl: false, preferCanvas: false
  });
  var bounds = L.latLngBounds(m.bounds);
  var overlays = {};
  var sliders = [];

  (m.images || []).forEach(function (im, i) {
    var pane = map.createPane("raster" + i);
    pane.style.zIndex = String(300 + i);
    var layer = L.imageOverlay(im.src, im.bounds, {
      opacity: im.opacity, pane: "raster" + i, interactive: false,
      className: im.pixelated ? "pixelated" : ""
    });
    if (im.shown) { layer.addTo(map); }
    overlays[im.label] = layer;
    if (im.slider) { sliders.push([im.label, layer, im.opacity]); }
  });

  var fp = m.footprints;
  if (fp && fp.features.length) {
    var fpLayer = L.geoJSON({type: "FeatureCollection", features: fp.features.map(function (f, i) {
      return {type: "Feature", geometry: f.geometry, properties: {i: i}};
    })}, {
      style: function (feat) {
        var f = fp.features[feat.properties.i];
        var c = fp.colours[f.status] || "#888888";
        return {color: c, weight: 2, opacity: 0.95, fillColor: c, fillOpacity: 0.12,
                dashArray: f.status === "failed" ? "6 4" : null};
      },
      onEachFeature: function (feat, layer) {
        var f = fp.features[feat.properties.i];
        layer.bindPopup(function () {
          var div = L.DomUtil.create("div", "popup");
          var h = L.DomUtil.create("div", "popup-title", div);
          h.textContent = (f.title || "scene") + " \u2014 " + f.status;
          div.appendChild(table(f.pairs));
          if (f.link) {
            var a = L.DomUtil.create("a", "", div);
            a.href = f.link;
            a.textContent = "open the scene report";
          }
          return div;
        }, {maxWidth: 420});
      }
    });
    fpLayer.addTo(map);
    overlays[fp.label] = fpLayer;
  }

  var pg = m.polygons;
  if (pg && pg.geometries.length) {
    var ci = pg.columns.indexOf(pg.colour_by);
    var lo = pg.domain[0], hi = pg.domain[1];
    var colourOf = function (row) {
      var v = ci >= 0 ? row[ci] : (pg.constants[pg.colour_by]);
      if (typeof v !== "number") { return "#ff2a00"; }
      return ramp(pg.ramp, hi > lo ? (v - lo) / (hi - lo) : 1);
    };
    var pgLayer = L.geoJSON({type: "FeatureCollection", features: pg.geometries.map(function (g, i) {
      return {type: "Feature", geometry: g, properties: {i: i}};
    })}, {
      style: function (feat) {
        var c = colourOf(pg.rows[feat.properties.i]);
        return {color: c, weight: 1.8, opacity: 1, fillColor: c, fillOpacity: 0.3};
      },
      onEachFeature: function (feat, layer) {
        layer.bindPopup(function () {
          var row = pg.rows[feat.properties.i];
          var pairs = pg.columns.map(function (c, k) { return [c, row[k]]; });
          Object.keys(pg.constants).forEach(function (c) { pairs.push([c, pg.constants[c]]); });
          var div = L.DomUtil.create("div", "popup");
          var h = L.DomUtil.create("div", "popup-title", div);
          var id = pg.columns.indexOf("landslide_id");
          h.textContent = "landslide " + (id >= 0 ? text(row[id]) : String(feat.properties.i + 1));
          div.appendChild(table(pairs));
          var note = L.DomUtil.create("div", "popup-note", div);
          note.textContent = "outline simplified for display; the GeoPackage holds the exact polygon";
          return div;
        }, {maxWidth: 420});
      }
    });
    pgLayer.addTo(map);
    overlays[pg.label] = pgLayer;
  }

  L.control.layers(null, overlays, {collapsed: false, position: "topright"}).addTo(map);

  if (sliders.length) {
    var Opacity = L.Control.extend({
      options: {position: "topright"},
      onAdd: function () {
        var div = L.DomUtil.create("div", "leaflet-bar report-control opacity-control");
        L.DomEvent.disableClickPropagation(div);
        L.DomEvent.disableScrollPropagation(div);
        sliders.forEach(function (s, k) {
          var label = L.DomUtil.create("label", "", div);
          label.textContent = s[0] + " opacity";
          label.htmlFor = "opacity-" + k;
          var input = L.DomUtil.create("input", "", div);
          input.type = "range"; input.min = "0"; input.max = "100"; input.step = "5";
          input.id = "opacity-" + k;
          input.value = String(Math.round(s[2] * 100));
          input.setAttribute("aria-label", s[0] + " opacity");
          L.DomEvent.on(input, "input", function () { s[1].setOpacity(Number(input.value) / 100); });
        });
        return div;
      }
    });
    new Opacity().addTo(map);
  }

  if (m.legend && m.legend.length) {
    var Legend = L.Control.extend({
      options: {position: "bottomright"},
      onAdd: function () {
        var div = L.DomUtil.create("div", "report-control legend");
        L.DomEvent.disableClickPropagation(div);
        m.legend.forEach(function (item) {
          var row = L.DomUtil.create("div", "legend-row", div);
          var key = L.DomUtil.create("span", item.kind === "gradient" ? "ramp" : "swatch", row);
          if (item.kind === "gradient") {
            key.style.background = item.css;
          } else {
            key.style.background = item.fill || "transparent";
            key.style.borderColor = item.colour;
            if (item.dashed) { key.style.borderStyle = "dashed"; }
          }
          var label = L.DomUtil.create("span", "legend-label", row);
          label.textContent = item.label;
        });
        return div;
      }
    });
    new Legend().addTo(map);
  }

  if (unitM) { L.control.scale({imperial: false, maxWidth: 160}).addTo(map); }

  var Coords = L.Control.extend({
    options: {position: "bottomleft"},
    onAdd: function () {
      var div = L.DomUtil.create("div", "report-control coords");
      div.textContent = m.coords.label;
      map.on("mousemove", function (e) {
        var x = e.latlng.lng, y = e.latlng.lat;
        if (m.coords.kind === "lonlat") {
          div.textContent = "lon " + (x / m.coords.coslat).toFixed(5) + "\u00b0  lat " + y.toFixed(5) + "\u00b0";
        } else {
          div.textContent = "x " + x.toFixed(m.coords.decimals) + "  y " + y.toFixed(m.coords.decimals) +
            "  (" + m.coords.label + ")";
        }
      });
      return div;
    }
  });
  new Coords().addTo(map);

  // zoom out to a few times the whole extent, in to m.max_zoom (a grid pixel about 16 screen pixels)
  var fit = map.getBoundsZoom(bounds);
  map.setMinZoom(fit - 3);
  map.setMaxZoom(Math.max(typeof m.max_zoom === "number" ? m.max_zoom : fit + 8, fit + 1));
  map.fitBounds(bounds);
  document.body.setAttribute("data-map-ready", "1");
})();

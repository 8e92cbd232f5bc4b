package bench

import (
	"errors"
	"fmt"
	"image/color"
	"io"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// Chart colours.
var (
	colCase = color.RGBA{31, 119, 180, 255}  // the plugin's case
	colBase = color.RGBA{150, 150, 150, 255} // its baseline
)

type panel struct {
	title string
	rows  []Row
}

// chartPanels groups the measured rows with a Chart panel name, in order.
func chartPanels(results []Result) []panel {
	var out []panel
	idx := map[string]int{}
	for _, r := range results {
		for _, row := range r.Rows {
			if row.Chart == "" || row.Unavailable != "" || len(row.Samples) == 0 {
				continue
			}
			i, ok := idx[row.Chart]
			if !ok {
				i = len(out)
				idx[row.Chart] = i
				out = append(out, panel{title: row.Chart})
			}
			out[i].rows = append(out[i].rows, row)
		}
	}
	return out
}

// WriteChart draws one PNG with a panel per chart group (throughput, ping
// RTT, ...): for each row a bar for the case and one for its baseline at
// the median, with whiskers from min to max.
func WriteChart(w io.Writer, results []Result) error {
	panels := chartPanels(results)
	if len(panels) == 0 {
		return errors.New("chart: no measured rows to draw")
	}
	plots := make([][]*plot.Plot, 1)
	for _, p := range panels {
		pl, err := panelPlot(p)
		if err != nil {
			return fmt.Errorf("chart %q: %w", p.title, err)
		}
		plots[0] = append(plots[0], pl)
	}
	const panelW, height = 5 * vg.Inch, 5.5 * vg.Inch
	img := vgimg.NewWith(vgimg.UseWH(panelW*vg.Length(len(panels)), height), vgimg.UseDPI(96))
	tiles := draw.Tiles{Rows: 1, Cols: len(panels), PadX: vg.Centimeter, PadTop: vg.Centimeter / 2,
		PadBottom: vg.Centimeter / 2, PadLeft: vg.Centimeter / 2, PadRight: vg.Centimeter / 2}
	canvases := plot.Align(plots, tiles, draw.New(img))
	for i, pl := range plots[0] {
		pl.Draw(canvases[0][i])
	}
	_, err := vgimg.PngCanvas{Canvas: img}.WriteTo(w)
	return err
}

// panelPlot is one panel: the case bars left of each tick, the baseline
// bars right of it, whiskers from min to max over both.
func panelPlot(p panel) (*plot.Plot, error) {
	pl := plot.New()
	pl.Title.Text = p.title
	pl.Y.Label.Text = p.rows[0].Unit
	pl.Y.Min = 0
	pl.Legend.Top = true
	pl.Add(plotter.NewGrid())

	var names []string
	var caseV, baseV plotter.Values
	var caseE, baseE whiskers
	for i, row := range p.rows {
		name := row.Name
		if row.BaseName != "" {
			name += " (vs " + row.BaseName + ")"
		}
		names = append(names, wrap(name, 24))
		s := Summarize(row.Samples)
		caseV = append(caseV, s.Median)
		caseE = append(caseE, whisker{x: float64(i) - 0.18, s: s})
		var b Stats
		if len(row.Base) > 0 {
			b = Summarize(row.Base)
			baseE = append(baseE, whisker{x: float64(i) + 0.18, s: b})
		}
		baseV = append(baseV, b.Median)
	}
	width := vg.Points(min(36, 200/float64(len(p.rows))))
	for _, set := range []struct {
		label string
		vals  plotter.Values
		xmin  float64
		col   color.Color
		err   whiskers
	}{
		{"plugin", caseV, -0.18, colCase, caseE},
		{"baseline", baseV, 0.18, colBase, baseE},
	} {
		bars, err := plotter.NewBarChart(set.vals, width)
		if err != nil {
			return nil, err
		}
		bars.XMin = set.xmin
		bars.Color = set.col
		bars.LineStyle.Width = 0
		pl.Add(bars)
		pl.Legend.Add(set.label, bars)
		if len(set.err) > 0 {
			eb, err := plotter.NewYErrorBars(set.err)
			if err != nil {
				return nil, err
			}
			pl.Add(eb)
		}
	}
	pl.NominalX(names...)
	pl.X.Min, pl.X.Max = -0.6, float64(len(p.rows))-0.4
	top := 0.0
	for _, w := range append(caseE, baseE...) {
		top = max(top, w.s.Max)
	}
	pl.Y.Max = top * 1.2 // room for the legend
	return pl, nil
}

// whisker is one bar's min-to-max range around its median.
type whisker struct {
	x float64
	s Stats
}

type whiskers []whisker

func (w whiskers) Len() int                    { return len(w) }
func (w whiskers) XY(i int) (float64, float64) { return w[i].x, w[i].s.Median }
func (w whiskers) YError(i int) (float64, float64) {
	return w[i].s.Median - w[i].s.Min, w[i].s.Max - w[i].s.Median
}

// wrap breaks s into lines of at most n characters, at spaces.
func wrap(s string, n int) string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(s) {
		if line != "" && len(line)+1+len(word) > n {
			lines = append(lines, line)
			line = word
			continue
		}
		line = strings.TrimSpace(line + " " + word)
	}
	return strings.Join(append(lines, line), "\n")
}

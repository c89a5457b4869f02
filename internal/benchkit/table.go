package benchkit

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
)

// Kind says which way a figure is better, and so how its ratio is taken.
type Kind int

const (
	// Throughput is higher-is-better: ratio = measured/ceiling. Its values
	// are rounded to whole units and shown with thousands separators.
	Throughput Kind = iota
	// Latency is lower-is-better (also a target not to exceed): ratio =
	// ceiling/measured. Its values are rounded to tenths.
	Latency
)

// Figure describes one figure of the table and of the JSON line.
type Figure struct {
	Key, Title, Unit string
	Kind             Kind
	Target           string  // the table's target column, as shown
	MinRatio         float64 // the ratio the target asks for; 0: none, no verdict
	// CeilingText, if not empty, is shown in the table's ceiling column
	// instead of the ceiling's value (the JSON line keeps the value).
	CeilingText string
}

// Value is a figure's two sides; nil where not measured.
type Value struct {
	Measured, Ceiling *float64
}

// Measured is &x, or nil for a NaN (not measured).
func Measured(x float64) *float64 {
	if math.IsNaN(x) {
		return nil
	}
	return &x
}

// Table is the layout of a benchmark's report: its figures, in order, and
// what the two sides are called.
type Table struct {
	Figures []Figure
	// Columns are the table's headers of the measured and the ceiling
	// columns, Fields their names in the JSON line.
	Columns, Fields [2]string
	// WholeLatencyFrom, if not 0, shows latencies of at least that many
	// units as whole numbers with thousands separators, not in tenths.
	WholeLatencyFrom float64
}

// Has reports whether key is one of the table's figures.
func (t Table) Has(key string) bool {
	for _, f := range t.Figures {
		if f.Key == key {
			return true
		}
	}
	return false
}

// Ratio is the figure's ratio, higher is better, or nil unless both sides
// are measured and positive.
func (f Figure) Ratio(v Value) *float64 {
	if v.Measured == nil || v.Ceiling == nil || *v.Measured <= 0 || *v.Ceiling <= 0 {
		return nil
	}
	r := *v.Measured / *v.Ceiling
	if f.Kind == Latency {
		r = *v.Ceiling / *v.Measured
	}
	return &r
}

// round keeps what the figure's unit can tell: whole units per second,
// tenths of the others.
func (f Figure) round(x float64) float64 {
	if f.Kind == Throughput {
		return math.Round(x)
	}
	return math.Round(x*10) / 10
}

func (t Table) format(f Figure, x *float64) string {
	if x == nil {
		return "—"
	}
	if f.Kind == Latency && (t.WholeLatencyFrom == 0 || *x < t.WholeLatencyFrom) {
		return fmt.Sprintf("%.1f %s", *x, f.Unit)
	}
	return fmt.Sprintf("%s %s", Thousands(int64(math.Round(*x))), f.Unit)
}

// Thousands is n with commas between groups of three digits.
func Thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 && s[i-1] != '-' {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// Write writes the table of the figures measured (figure, the two
// columns, ratio, target with an ok or MISSED verdict), a blank line, the
// notes and, after another blank line, the JSON line.
func (t Table) Write(w io.Writer, values map[string]Value, notes []string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "figure\t%s\t%s\tratio\ttarget\t\n", t.Columns[0], t.Columns[1])
	for _, f := range t.Figures {
		v, ok := values[f.Key]
		if !ok {
			continue
		}
		ceiling := t.format(f, v.Ceiling)
		if f.CeilingText != "" {
			ceiling = f.CeilingText
		}
		ratio, verdict := "—", ""
		if q := f.Ratio(v); q != nil {
			ratio = fmt.Sprintf("%.3f", *q)
			if f.MinRatio > 0 {
				verdict = "  ok"
				if *q < f.MinRatio {
					verdict = "  MISSED"
				}
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s%s\t\n", f.Title, t.format(f, v.Measured), ceiling, ratio, f.Target, verdict)
	}
	tw.Flush()

	fmt.Fprintln(w, "\nNotes:")
	for _, n := range notes {
		fmt.Fprintln(w, "- "+n)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, t.JSON(values))
}

// JSON is a run's last line: for each figure, measured or not, an object
// of the measured value, the ceiling's (under Fields) and their ratio,
// null where not measured.
func (t Table) JSON(values map[string]Value) string {
	number := func(x *float64, round func(float64) float64) []byte {
		if x == nil {
			return []byte("null")
		}
		data, _ := json.Marshal(round(*x)) // cannot fail: a finite float
		return data
	}
	name := func(s string) []byte {
		data, _ := json.Marshal(s)
		return data
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, f := range t.Figures {
		v := values[f.Key]
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s:{%s:%s,%s:%s,\"ratio\":%s}", name(f.Key),
			name(t.Fields[0]), number(v.Measured, f.round),
			name(t.Fields[1]), number(v.Ceiling, f.round),
			number(f.Ratio(v), func(x float64) float64 { return math.Round(x*1000) / 1000 }))
	}
	b.WriteByte('}')
	return b.String()
}

// A Report collects the figures and notes of a run, for its table.
type Report struct {
	Server string // the server's version
	table  Table
	values map[string]Value
	notes  []string
}

// NewReport returns an empty report of the table's figures.
func (t Table) NewReport() *Report {
	return &Report{table: t, values: make(map[string]Value)}
}

// Set records a figure; a NaN leaves that side unmeasured. A key that is
// not the table's is a bug: Set panics.
func (r *Report) Set(key string, measured, ceiling float64) {
	if !r.table.Has(key) {
		panic("unknown figure " + key)
	}
	r.values[key] = Value{Measured: Measured(measured), Ceiling: Measured(ceiling)}
}

// Note adds a note, shown under the table.
func (r *Report) Note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

// Write writes the table of the report (see Table.Write).
func (r *Report) Write(w io.Writer) { r.table.Write(w, r.values, r.notes) }

// Value returns what Set recorded for key, or the zero Value.
func (r *Report) Value(key string) Value { return r.values[key] }

package benchkit

import (
	"bytes"
	"flag"
	"math"
	"testing"

	"github.com/stretchr/testify/require"
)

var testTable = Table{
	Columns:          [2]string{"mine", "the ceiling"},
	Fields:           [2]string{"mine", "max"},
	WholeLatencyFrom: 100,
	Figures: []Figure{
		{Key: "rate", Title: "rate", Unit: "op/s", Kind: Throughput, Target: "ratio ≥ 0.5", MinRatio: 0.5},
		{Key: "lat", Title: "latency", Unit: "µs", Kind: Latency, Target: "ratio ≥ 1", MinRatio: 1},
		{Key: "heap", Title: "heap", Unit: "MB", Kind: Latency, Target: "< 9 MB", MinRatio: 1, CeilingText: "(target)"},
		{Key: "part", Title: "part", Unit: "µs", Kind: Latency},
		{Key: "unmeasured", Title: "unmeasured", Unit: "µs", Kind: Latency},
	},
}

func TestTableWritesTheTableNotesAndJSONLine(t *testing.T) {
	values := map[string]Value{
		"rate": {Measured(1234.4), Measured(2000)},
		"lat":  {Measured(150.26), Measured(99.94)},
		"heap": {Measured(4.5), Measured(9)},
		"part": {Measured(math.NaN()), Measured(12.34)},
	}
	var b bytes.Buffer
	testTable.Write(&b, values, []string{"a note"})
	require.Equal(t, `figure   mine        the ceiling  ratio  target             
rate     1,234 op/s  2,000 op/s   0.617  ratio ≥ 0.5  ok    
latency  150 µs      99.9 µs      0.665  ratio ≥ 1  MISSED  
heap     4.5 MB      (target)     2.000  < 9 MB  ok         
part     —           12.3 µs      —                         

Notes:
- a note

{"rate":{"mine":1234,"max":2000,"ratio":0.617},"lat":{"mine":150.3,"max":99.9,"ratio":0.665},"heap":{"mine":4.5,"max":9,"ratio":2},"part":{"mine":null,"max":12.3,"ratio":null},"unmeasured":{"mine":null,"max":null,"ratio":null}}
`, b.String())
	require.True(t, testTable.Has("part"))
	require.False(t, testTable.Has("nope"))
}

func TestThousands(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 1234567: "1,234,567", -123: "-123", -1234: "-1,234"} {
		require.Equal(t, want, Thousands(n))
	}
}

func TestFlagsFillSizesByModeAndCheckThem(t *testing.T) {
	t.Setenv("DATABASE_URL", "")
	parse := func(args ...string) (url string, quick bool, n, g, v int, err error) {
		f := NewFlags("test", &url, &quick, "quick")
		f.Sized(&n, "n", 100, 10, "n")
		f.Positive(&g, "g", 8, "g")
		f.ValueBytes(&v, "v")
		f.SetOutput(new(bytes.Buffer))
		err = f.Parse(args)
		return
	}
	url, quick, n, g, v, err := parse()
	require.NoError(t, err)
	require.Equal(t, DefaultURL, url)
	require.False(t, quick)
	require.Equal(t, []int{100, 8, 200}, []int{n, g, v})
	_, _, n, _, _, err = parse("-quick")
	require.NoError(t, err)
	require.Equal(t, 10, n)
	_, _, n, _, _, err = parse("-quick", "-n", "3")
	require.NoError(t, err)
	require.Equal(t, 3, n)
	_, _, _, _, _, err = parse("-g", "0")
	require.EqualError(t, err, "sizes, -goroutines and -rounds must be at least 1")
	_, _, _, _, _, err = parse("-value-bytes", "100")
	require.EqualError(t, err, "-value-bytes must be at least 160")
	_, _, _, _, _, err = parse("extra")
	require.EqualError(t, err, `unexpected arguments: ["extra"]`)
	_, _, _, _, _, err = parse("-h")
	require.ErrorIs(t, err, flag.ErrHelp)
}

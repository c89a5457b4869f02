// Package benchkit holds what the repository's benchmark programs share: the
// records they write and how they summarise latencies.
package benchkit

import (
	"slices"
	"strconv"
	"time"
)

// AppendValue appends a JSON object of exactly size bytes (size at least
// 160), shaped like a realtime record (numbers, a nested object, an array, a
// string), that differs with n and version.
func AppendValue(dst []byte, n int, version int64, size int) []byte {
	start := len(dst)
	dst = append(dst, `{"n":`...)
	dst = strconv.AppendInt(dst, int64(n), 10)
	dst = append(dst, `,"version":`...)
	dst = strconv.AppendInt(dst, version, 10)
	dst = append(dst, `,"owner":"user-`...)
	dst = strconv.AppendInt(dst, int64(n%1000), 10)
	dst = append(dst, `","pos":{"x":`...)
	dst = strconv.AppendInt(dst, int64(n%360), 10)
	dst = append(dst, `.5,"y":-`...)
	dst = strconv.AppendInt(dst, int64(n%180)+version, 10)
	dst = append(dst, `.25},"speed":`...)
	dst = strconv.AppendInt(dst, int64(n%120), 10)
	dst = append(dst, `,"tags":["red","fast"],"note":"`...)
	for len(dst)-start < size-2 {
		dst = append(dst, byte('a'+(n+len(dst))%26))
	}
	return append(dst, `"}`...)
}

// Percentiles returns the median and the 99th percentile (nearest rank) of
// a non-empty sample.
func Percentiles(d []time.Duration) (p50, p99 time.Duration) {
	s := slices.Clone(d)
	slices.Sort(s)
	rank := func(p int) time.Duration { return s[max((len(s)*p+99)/100-1, 0)] }
	return rank(50), rank(99)
}

// Micros is d in microseconds.
func Micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

package benchkit

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestAppendValueIsJSONOfExactlyTheSizeAndDiffersWithNAndVersion(t *testing.T) {
	for _, size := range []int{160, 200, 1000} {
		v := AppendValue(nil, 7, 1, size)
		require.Len(t, v, size)
		require.True(t, json.Valid(v), "%s", v)
		require.NotEqual(t, v, AppendValue(nil, 8, 1, size))
		require.NotEqual(t, v, AppendValue(nil, 7, 2, size))
	}
}

func TestPercentilesAreNearestRank(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	p50, p99 := Percentiles(d)
	require.Equal(t, 50*time.Millisecond, p50)
	require.Equal(t, 99*time.Millisecond, p99)
	require.Equal(t, 1500.0, Micros(1500*time.Microsecond))
}

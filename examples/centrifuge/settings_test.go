package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"io"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

func parse(args []string, env map[string]string) (*settings, error) {
	fs := flag.NewFlagSet("centrifuge", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return parseSettings(fs, args, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
}

func TestSettingsDefaults(t *testing.T) {
	t.Parallel()
	s, err := parse(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.addr != ":8000" || s.cfg.Schema != DefaultSchema || !slices.Equal(s.cfg.Channels, []string{"demo"}) ||
		s.cfg.Retention != time.Hour || s.cfg.KeyTTL != 0 || s.cfg.StreamSize != 10_000 || s.cfg.StreamTTL != 10*time.Minute {
		t.Fatalf("defaults: %+v %+v", s, s.cfg)
	}
	if c := s.pool.ConnConfig; c.Host != "127.0.0.1" || c.Port != 5432 || c.User != "postgres" || c.Database != "test" {
		t.Fatalf("default database: %s@%s:%d/%s", c.User, c.Host, c.Port, c.Database)
	}
	if name := s.pool.ConnConfig.RuntimeParams["application_name"]; name != pgstore.DefaultApplicationName {
		t.Fatalf("application_name %q", name)
	}
}

func TestSettingsFromFlagsAndEnvironment(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"DATABASE_URL":        "postgres://app@db.internal/app?pool_max_conns=12",
		"CENTRIFUGE_ADDR":     ":9000",
		"CENTRIFUGE_CHANNELS": "cars, bikes,",
		"CENTRIFUGE_KEY_TTL":  "30s",
		"CENTRIFUGE_SCHEMA":   "", // empty counts as unset
	}
	s, err := parse([]string{"-addr", ":9001", "-stream-size", "500"}, env)
	if err != nil {
		t.Fatal(err)
	}
	if s.addr != ":9001" {
		t.Errorf("addr %q: the flag wins over its variable", s.addr)
	}
	if s.pool.ConnConfig.Host != "db.internal" || s.pool.MaxConns != 12 {
		t.Errorf("pool: %s, %d connections", s.pool.ConnConfig.Host, s.pool.MaxConns)
	}
	if !slices.Equal(s.cfg.Channels, []string{"cars", "bikes"}) || s.cfg.KeyTTL != 30*time.Second || s.cfg.StreamSize != 500 || s.cfg.Schema != DefaultSchema {
		t.Errorf("settings: %+v", s.cfg)
	}
}

func TestInvalidSettingsAreRefusedAndSayWhy(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"extra"}, nil, `unexpected argument "extra"`},
		{[]string{"-retention", "30s", "-stream-ttl", "10s"}, nil, "-retention: 30s is under pgstore's least, 1m"},
		{[]string{"-stream-ttl", "2h"}, nil, "-retention (1h0m0s) must exceed -stream-ttl (2h0m0s)"},
		{[]string{"-key-ttl", "-1s"}, nil, "-key-ttl: -1s is negative"},
		{[]string{"-stream-size", "0"}, nil, "-stream-size: 0"},
		{[]string{"-channels", " , "}, nil, "-channels names no channel"},
		{[]string{"-channels", "demo,cars/bmw"}, nil, `-channels: channel "cars/bmw" holds a /`},
		{nil, map[string]string{"CENTRIFUGE_STREAM_SIZE": "many"}, `invalid value "many" for CENTRIFUGE_STREAM_SIZE`},
		{[]string{"-url", "postgres://u@h/d?pool_max_conns=1"}, nil, "pool_max_conns=1; the store and the broker need at least 2"},
		{[]string{"-url", "postgres://u:s3cret@h:port/d"}, nil, "-url: cannot parse"},
	} {
		_, err := parse(c.args, c.env)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q %v: %v, want %q", c.args, c.env, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%q: the error shows the password: %v", c.args, err)
		}
	}
}

// The command serves until its context ends, then stops.
func TestRunServesThePageUntilStopped(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	s, err := parse([]string{"-addr", "127.0.0.1:0", "-url", pgtest.URL(t), "-schema", schema}, nil)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- run(ctx, s, logger) }()

	page := regexp.MustCompile(`page=(http://\S+)`)
	var url string
	deadline := time.Now().Add(waitTimeout)
	for url == "" {
		if m := page.FindStringSubmatch(logs.String()); m != nil {
			url = m[1]
			continue
		}
		select {
		case err := <-ran:
			t.Fatalf("run ended: %v; logs: %s", err, logs)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("not serving after %v; logs: %s", waitTimeout, logs)
		}
	}
	for _, path := range []string{"", "app.js", "vendor/centrifuge.js"} {
		resp, err := http.Get(url + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || len(body) == 0 || resp.Header.Get("Content-Security-Policy") == "" {
			t.Fatalf("GET /%s: %s, %d bytes, CSP %q", path, resp.Status, len(body), resp.Header.Get("Content-Security-Policy"))
		}
	}
	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("run still running after its context ended")
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// The vendored bundle is the one web/vendor/README.md names.
func TestVendoredBundleIsTheRecordedOne(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("web/vendor/README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("SHA-256 is\\s+`([0-9a-f]{64})`").FindSubmatch(readme)
	if m == nil {
		t.Fatal("web/vendor/README.md names no SHA-256")
	}
	bundle, err := web.ReadFile("web/vendor/centrifuge.js")
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(bundle); hex.EncodeToString(sum[:]) != string(m[1]) {
		t.Fatalf("web/vendor/centrifuge.js has SHA-256 %x, README.md says %s: run web/vendor.sh", sum, m[1])
	}
	for _, f := range []string{"web/vendor/LICENSE", "web/vendor/THIRD_PARTY.md"} {
		if _, err := os.Stat(f); err != nil {
			t.Error(err)
		}
	}
}

package main

import (
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/connstr"
	"github.com/pgstore/pgstore/internal/envflag"
)

// defaultURL is the database of a command given none.
const defaultURL = "postgres://postgres@127.0.0.1:5432/test"

// settings are the command's configuration.
type settings struct {
	addr string
	pool *pgxpool.Config
	cfg  Config // without Pool and Logger
}

// envVars names the environment variable that stands in for each flag.
var envVars = []envflag.Var{
	{Flag: "addr", Env: "CENTRIFUGE_ADDR"},
	{Flag: "url", Env: "DATABASE_URL"},
	{Flag: "schema", Env: "CENTRIFUGE_SCHEMA"},
	{Flag: "channels", Env: "CENTRIFUGE_CHANNELS"},
	{Flag: "retention", Env: "CENTRIFUGE_RETENTION"},
	{Flag: "key-ttl", Env: "CENTRIFUGE_KEY_TTL"},
	{Flag: "stream-size", Env: "CENTRIFUGE_STREAM_SIZE"},
	{Flag: "stream-ttl", Env: "CENTRIFUGE_STREAM_TTL"},
}

// parseSettings defines the command's flags on fs and parses args. What the
// command line leaves out comes from the environment variables that
// lookupEnv reads (os.LookupEnv, but tests leave the process's environment
// alone); an empty variable counts as unset. pgx reads its PG* variables
// itself.
func parseSettings(fs *flag.FlagSet, args []string, lookupEnv func(string) (string, bool)) (*settings, error) {
	var s settings
	var url, channels string
	fs.StringVar(&s.addr, "addr", ":8000", "`address` to serve the page and WebSocket clients on")
	fs.StringVar(&url, "url", defaultURL, "PostgreSQL connection `URL` (or key=value string), with any pgx setting such as pool_max_conns")
	fs.StringVar(&s.cfg.Schema, "schema", DefaultSchema, "PostgreSQL `schema` of the channels; every node of a cluster names the same")
	fs.StringVar(&channels, "channels", strings.Join(DefaultChannels, ","), "comma-separated map `channels` clients may use (each is a table); * for any")
	fs.DurationVar(&s.cfg.Retention, "retention", DefaultRetention, "how long the change log keeps changes; more than -stream-ttl")
	fs.DurationVar(&s.cfg.KeyTTL, "key-ttl", 0, "expire keys not set again within this `duration` (MapModeRecoverable); 0 keeps them until removed (MapModePersistent)")
	fs.IntVar(&s.cfg.StreamSize, "stream-size", DefaultStreamSize, "how many last changes of a channel a reconnecting client can recover")
	fs.DurationVar(&s.cfg.StreamTTL, "stream-ttl", DefaultStreamTTL, "how long a channel's changes stay recoverable after its last one")
	if _, err := envflag.Parse(fs, args, envVars, lookupEnv); err != nil {
		return nil, err
	}
	for ch := range strings.SplitSeq(channels, ",") {
		if ch = strings.TrimSpace(ch); ch != "" {
			s.cfg.Channels = append(s.cfg.Channels, ch)
		}
	}
	if len(s.cfg.Channels) == 0 {
		return nil, errors.New("-channels names no channel")
	}
	for _, ch := range s.cfg.Channels {
		if ch != "*" {
			if err := checkChannel(ch); err != nil {
				return nil, fmt.Errorf("-channels: %w", err)
			}
		}
	}
	switch {
	case s.cfg.Retention < time.Minute:
		return nil, fmt.Errorf("-retention: %v is under pgstore's least, 1m", s.cfg.Retention)
	case s.cfg.KeyTTL < 0:
		return nil, fmt.Errorf("-key-ttl: %v is negative; give 0 to keep keys until removed", s.cfg.KeyTTL)
	case s.cfg.StreamSize < 1:
		return nil, fmt.Errorf("-stream-size: %d; a stream keeps at least 1 change", s.cfg.StreamSize)
	case s.cfg.StreamTTL <= 0:
		return nil, fmt.Errorf("-stream-ttl: %v; give a positive duration", s.cfg.StreamTTL)
	case s.cfg.Retention <= s.cfg.StreamTTL:
		return nil, fmt.Errorf("-retention (%v) must exceed -stream-ttl (%v): a stream is read from the change log", s.cfg.Retention, s.cfg.StreamTTL)
	}
	pool, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("-url: cannot parse the connection string: %s", connstr.ErrorText(err, ""))
	}
	if pool.MaxConns < 2 {
		return nil, fmt.Errorf("-url: pool_max_conns=%d; the store and the broker need at least 2", pool.MaxConns)
	}
	if pool.ConnConfig.RuntimeParams["application_name"] == "" {
		pool.ConnConfig.RuntimeParams["application_name"] = pgstore.DefaultApplicationName
	}
	s.pool = pool
	return &s, nil
}

package main

import (
	"flag"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/connstr"
	"github.com/pgstore/pgstore/internal/envflag"
)

// settings are the command's configuration.
type settings struct {
	addr      string
	schema    string
	retention time.Duration
	pool      *pgxpool.Config
	limits    Limits
}

// envVars names the environment variable that stands in for each flag, in
// the order README.md lists them.
var envVars = []envflag.Var{
	{Flag: "addr", Env: "REALTIME_ADDR"},
	{Flag: "url", Env: "DATABASE_URL"},
	{Flag: "db-host", Env: "REALTIME_DB_HOST"},
	{Flag: "db-port", Env: "REALTIME_DB_PORT"},
	{Flag: "db-user", Env: "REALTIME_DB_USER"},
	{Flag: "db-password", Env: "REALTIME_DB_PASSWORD"},
	{Flag: "db-name", Env: "REALTIME_DB_NAME"},
	{Flag: "db-sslmode", Env: "REALTIME_DB_SSLMODE"},
	{Flag: "db-sslrootcert", Env: "REALTIME_DB_SSLROOTCERT"},
	{Flag: "db-sslcert", Env: "REALTIME_DB_SSLCERT"},
	{Flag: "db-sslkey", Env: "REALTIME_DB_SSLKEY"},
	{Flag: "db-pool-size", Env: "REALTIME_DB_POOL_SIZE"},
	{Flag: "schema", Env: "REALTIME_SCHEMA"},
	{Flag: "retention", Env: "REALTIME_RETENTION"},
	{Flag: "max-value-bytes", Env: "REALTIME_MAX_VALUE_BYTES"},
	{Flag: "max-subscriptions", Env: "REALTIME_MAX_SUBSCRIPTIONS"},
	{Flag: "max-messages-per-second", Env: "REALTIME_MAX_MESSAGES_PER_SECOND"},
}

// connFlags are the settings that a URL holds too: giving both would leave
// unclear which one is meant.
var connFlags = []string{"db-host", "db-port", "db-user", "db-password", "db-name", "db-sslmode", "db-sslrootcert", "db-sslcert", "db-sslkey"}

// sslModes are those pgx knows.
var sslModes = []string{"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}

// parseSettings defines the command's flags on fs and parses args. What the
// command line leaves out comes from the environment variables that lookupEnv
// reads (os.LookupEnv, but tests leave the process's environment alone); an
// empty variable counts as unset. PG* variables, which pgx reads itself, fill
// in what is still missing, such as PGPASSWORD.
func parseSettings(fs *flag.FlagSet, args []string, lookupEnv func(string) (string, bool)) (*settings, error) {
	var (
		s        settings
		url      string
		host     string
		port     int
		user     string
		password string
		dbname   string
		sslMode  string
		rootCert string
		cert     string
		key      string
		poolSize int
	)
	fs.StringVar(&s.addr, "addr", ":8080", "`address` to serve HTTP and WebSocket clients on")
	fs.StringVar(&url, "url", "", "PostgreSQL connection `URL` (or key=value string), instead of the -db-* settings")
	fs.StringVar(&host, "db-host", "127.0.0.1", "PostgreSQL `host`")
	fs.IntVar(&port, "db-port", 5432, "PostgreSQL `port`")
	fs.StringVar(&user, "db-user", "postgres", "PostgreSQL `user`")
	fs.StringVar(&password, "db-password", "", "PostgreSQL `password` (default: PGPASSWORD or ~/.pgpass)")
	fs.StringVar(&dbname, "db-name", "test", "PostgreSQL `database`")
	fs.StringVar(&sslMode, "db-sslmode", "", "TLS `mode`: disable, allow, prefer, require, verify-ca or verify-full (default: PGSSLMODE, else prefer)")
	fs.StringVar(&rootCert, "db-sslrootcert", "", "`file` of the CA certificates that verify the server")
	fs.StringVar(&cert, "db-sslcert", "", "`file` of the client certificate; needs -db-sslkey")
	fs.StringVar(&key, "db-sslkey", "", "`file` of the client certificate's private key; needs -db-sslcert")
	fs.IntVar(&poolSize, "db-pool-size", 0, "most PostgreSQL `connections` (default: the URL's pool_max_conns, else pgx's: 4 or one per CPU)")
	fs.StringVar(&s.schema, "schema", "realtime", "PostgreSQL `schema` that holds the records")
	fs.DurationVar(&s.retention, "retention", 24*time.Hour, "how long the schema's change log keeps changes (0: no log, the NOTIFY feed)")
	fs.IntVar(&s.limits.MaxValueBytes, "max-value-bytes", defaultMaxValueBytes, "largest value a client may set, in `bytes` of JSON")
	fs.IntVar(&s.limits.MaxSubscriptions, "max-subscriptions", defaultMaxSubscriptions, "most keys and tables one client may subscribe to")
	fs.IntVar(&s.limits.MessagesPerSecond, "max-messages-per-second", 0, "most messages a second from one client, in bursts of up to a second's worth (0: no limit)")
	// given names the flag or variable that set each setting the command
	// line or the environment sets.
	given, err := envflag.Parse(fs, args, envVars, lookupEnv)
	if err != nil {
		return nil, err
	}
	// either names a setting as it was given, or else both ways to give it.
	either := func(name string) string {
		if g := given[name]; g != "" {
			return g
		}
		i := slices.IndexFunc(envVars, func(v envflag.Var) bool { return v.Flag == name })
		return "-" + name + " (or " + envVars[i].Env + ")"
	}

	if url != "" {
		var mixed []string
		for _, name := range connFlags {
			if g := given[name]; g != "" {
				mixed = append(mixed, g)
			}
		}
		if len(mixed) > 0 {
			return nil, fmt.Errorf("%s cannot be used with %s: give the connection as a URL or as separate settings, not both", strings.Join(mixed, ", "), given["url"])
		}
	}
	switch {
	case port < 1 || port > math.MaxUint16:
		return nil, fmt.Errorf("%s: %d is not a port number (1 to 65535)", either("db-port"), port)
	case sslMode != "" && !slices.Contains(sslModes, sslMode):
		return nil, fmt.Errorf("%s: unknown TLS mode %q; use %s", either("db-sslmode"), sslMode, strings.Join(sslModes, ", "))
	case cert != "" && key == "":
		return nil, fmt.Errorf("%s is set but %s is not: a client certificate needs the file of its private key", either("db-sslcert"), either("db-sslkey"))
	case key != "" && cert == "":
		return nil, fmt.Errorf("%s is set but %s is not: a client key needs the file of its certificate", either("db-sslkey"), either("db-sslcert"))
	case poolSize < 0 || poolSize > math.MaxInt32:
		return nil, fmt.Errorf("%s: %d connections; give at least 1, or 0 for the default", either("db-pool-size"), poolSize)
	case s.retention < 0:
		return nil, fmt.Errorf("%s: %v is negative; give 0 for no change log", either("retention"), s.retention)
	case s.limits.MaxValueBytes < 1 || s.limits.MaxValueBytes > maxValueBytesLimit:
		return nil, fmt.Errorf("%s: %d bytes is not between 1 and %d (what pgstore stores and a list reply holds)", either("max-value-bytes"), s.limits.MaxValueBytes, maxValueBytesLimit)
	case s.limits.MaxSubscriptions < 1:
		return nil, fmt.Errorf("%s: %d; a client needs at least 1 subscription", either("max-subscriptions"), s.limits.MaxSubscriptions)
	case s.limits.MessagesPerSecond < 0:
		return nil, fmt.Errorf("%s: %d is negative; give 0 for no limit", either("max-messages-per-second"), s.limits.MessagesPerSecond)
	}

	connString := url
	if url == "" {
		connString = keywordValues(
			"host", host, "port", fmt.Sprint(port), "user", user, "password", password, "dbname", dbname,
			"sslmode", sslMode, "sslrootcert", rootCert, "sslcert", cert, "sslkey", key)
	}
	cfg, err := pgxpool.ParseConfig(connString)
	switch {
	case err != nil && url != "":
		return nil, fmt.Errorf("%s: cannot parse the connection string: %s", given["url"], connstr.ErrorText(err, ""))
	case err != nil:
		return nil, fmt.Errorf("the -db-* settings: %s", connstr.ErrorText(err, ""))
	}
	if poolSize > 0 {
		cfg.MaxConns = int32(poolSize)
	}
	if cfg.ConnConfig.RuntimeParams["application_name"] == "" {
		// As pgstore.Connect does, so that operators can tell the
		// sessions apart in pg_stat_activity.
		cfg.ConnConfig.RuntimeParams["application_name"] = pgstore.DefaultApplicationName
	}
	s.pool = cfg
	return &s, nil
}

// keywordValues writes keyword and value pairs as a keyword/value connection
// string, leaving out empty values so that pgx's defaults apply. Each value is
// quoted, so that any character (spaces, quotes, backslashes) reaches pgx as
// it is.
func keywordValues(pairs ...string) string {
	escape := strings.NewReplacer(`\`, `\\`, `'`, `\'`)
	var b strings.Builder
	for i := 0; i < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(pairs[i] + "='" + escape.Replace(pairs[i+1]) + "'")
	}
	return b.String()
}

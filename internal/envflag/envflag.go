// Package envflag gives the example servers' flags environment variables
// that stand in for them.
package envflag

import (
	"flag"
	"fmt"
)

// A Var names the environment variable that stands in for a flag.
type Var struct{ Flag, Env string }

// Parse adds each variable's name to its flag's usage, parses args on fs,
// refuses arguments that are not flags, and then sets each flag that the
// command line left out from its variable, read with lookupEnv (os.LookupEnv,
// or a test's own); an empty variable counts as unset. It returns how each
// setting given was given: "-flag", or the variable's name.
func Parse(fs *flag.FlagSet, args []string, vars []Var, lookupEnv func(string) (string, bool)) (given map[string]string, err error) {
	for _, v := range vars {
		fs.Lookup(v.Flag).Usage += " [$" + v.Env + "]"
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: every setting is a flag", fs.Arg(0))
	}
	given = make(map[string]string)
	fs.Visit(func(f *flag.Flag) { given[f.Name] = "-" + f.Name })
	for _, v := range vars {
		if given[v.Flag] != "" {
			continue
		}
		val, _ := lookupEnv(v.Env)
		if val == "" {
			continue
		}
		if err := fs.Set(v.Flag, val); err != nil {
			return nil, fmt.Errorf("invalid value %q for %s: %v", val, v.Env, err)
		}
		given[v.Flag] = v.Env
	}
	return given, nil
}

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// usageError is a bad flag or argument: one line on stderr, exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// envName maps a flag name to its environment variable: http-addr -> ASYNCNODE_HTTP_ADDR.
func envName(flagName string) string {
	return "ASYNCNODE_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseFlags applies ASYNCNODE_* environment variables, then the command
// line (flags win). Errors are usageErrors naming the flag.
func parseFlags(fs *flag.FlagSet, args []string, env func(string) string) error {
	fs.SetOutput(io.Discard)
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if envErr != nil {
			return
		}
		if v := env(envName(f.Name)); v != "" {
			if err := f.Value.Set(v); err != nil {
				envErr = usagef("invalid value %q for %s: %v", v, envName(f.Name), err)
			}
		}
	})
	if envErr != nil {
		return envErr
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	if fs.NArg() > 0 && fs.Name() != "join" {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// printDefaults writes a flag set's help, with each flag's env variable.
func printDefaults(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		def := ""
		if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "false" && f.DefValue != "[]" {
			def = fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintf(w, "  --%-16s %s%s [$%s]\n", f.Name, f.Usage, def, envName(f.Name))
	})
}

// listFlag is a comma-separated, repeatable list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

func osEnv(k string) string { return os.Getenv(k) }

func positive(name string, d time.Duration) error {
	if d <= 0 {
		return usagef("--%s must be positive, got %s", name, d)
	}
	return nil
}

# shellcheck shell=bash
# Option parsing shared by the launch scripts (sourced; PROG names the script in messages).

die() { echo "$PROG: $*" >&2; exit 2; }
# the value of option $1 is $2: it must be there, non-empty, and not the next option or `--`
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }
# int_opt VAR NAME VALUE MIN [MAX]: VAR=VALUE when it is a decimal integer in range, else exit 2
int_opt() {
  local v="$3"
  [[ "$v" =~ ^[0-9]{1,9}$ ]] || die "$2 needs an integer, got '$v'"
  v=$((10#$v))                                  # no octal surprises from leading zeros
  (( v >= $4 )) || die "$2 must be at least $4, got $v"
  [[ -z "${5:-}" ]] || (( v <= $5 )) || die "$2 must be at most $5, got $v"
  printf -v "$1" '%d' "$v"
}

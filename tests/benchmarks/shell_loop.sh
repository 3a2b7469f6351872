#!/usr/bin/env bash
# The loop a user would write instead of scenario-watch: the baseline bench.py measures.
# inotifywait on the inbox; each file is POSTed with curl; a background subshell polls the job every
# second with curl + jq, then fetches each asset's URL and downloads it with curl -o.
# A finished prompt leaves <stem>.done in the outbox (what bench.py counts).
#
# usage: shell_loop.sh INBOX OUTBOX BASE_URL KEY SECRET
set -u
inbox=$1 outbox=$2 base=$3 auth="$4:$5"
model=model_google-gemini-pro-image-editing

finish() {  # poll one job every second (at most 300 times), then download its images
    local job=$1 stem=$2 answer status asset url n=0
    for _ in $(seq 1 300); do
        sleep 1
        answer=$(curl -s -u "$auth" "$base/jobs/$job")
        status=$(jq -r '.job.status' <<<"$answer")
        case $status in
            success)
                for asset in $(jq -r '.job.metadata.assetIds[]' <<<"$answer"); do
                    n=$((n + 1))
                    url=$(curl -s -u "$auth" "$base/assets/$asset" | jq -r '.asset.url')
                    curl -s -o "$outbox/${stem}_$n.png" "$url"
                done
                touch "$outbox/$stem.done"
                return
                ;;
            failure | canceled)
                echo "$stem: job $job ended $status" >&2
                return
                ;;
        esac
    done
}

inotifywait -m -e moved_to -e close_write --format '%f' "$inbox" | while read -r name; do
    case $name in
        .* | *.tmp) continue ;;
        *.json) ;;
        *) continue ;;
    esac
    answer=$(curl -s -u "$auth" -H 'Content-Type: application/json' \
        --data-binary "@$inbox/$name" "$base/generate/custom/$model")
    job=$(jq -r '.job.jobId // empty' <<<"$answer")
    if [ -z "$job" ]; then
        echo "$name: $answer" >&2
        continue
    fi
    finish "$job" "${name%.json}" &
done

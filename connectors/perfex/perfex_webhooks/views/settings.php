<?php defined('BASEPATH') or exit('No direct script access allowed'); ?>
<?php init_head(); ?>
<div id="wrapper">
  <div class="content">
    <div class="row">
      <div class="col-md-8">
        <h4 class="tw-mt-0 tw-font-semibold">Webhooks pipeline</h4>
        <div class="panel_s"><div class="panel-body">
          <?php echo form_open(admin_url('perfex_webhooks')); ?>
          <div class="form-group">
            <label for="url">Ingest URL</label>
            <input type="url" class="form-control" id="url" name="url" placeholder="http://webhooks.internal:6066/api/events"
                   value="<?php echo html_escape($url); ?>">
          </div>
          <div class="form-group">
            <label for="token">Ingest token</label>
            <input type="password" class="form-control" id="token" name="token" autocomplete="off"
                   placeholder="<?php echo $has_token ? 'stored (leave empty to keep)' : 'WEBHOOKS_INGEST_TOKEN of the pipeline'; ?>">
          </div>
          <div class="form-group">
            <label for="timeout_ms">Timeout (ms): the longest a CRM request waits for the pipeline</label>
            <input type="number" class="form-control" id="timeout_ms" name="timeout_ms" min="200" max="10000"
                   value="<?php echo html_escape($timeout_ms); ?>">
          </div>
          <h5>Events sent</h5>
          <?php $byResource = [];
          foreach ($map['events'] as $name => $spec) {
              $byResource[$spec['resource']][$name] = $spec;
          } ?>
          <?php foreach ($byResource as $resource => $events) { ?>
            <p class="tw-font-medium tw-mb-1"><?php echo html_escape($resource); ?></p>
            <?php foreach ($events as $name => $spec) { ?>
              <div class="checkbox checkbox-primary">
                <input type="checkbox" name="events[]" id="ev_<?php echo html_escape($name); ?>" value="<?php echo html_escape($name); ?>"
                  <?php echo $module->enabled($name) ? 'checked' : ''; ?>>
                <label for="ev_<?php echo html_escape($name); ?>"><?php echo html_escape($name); ?>
                  <small class="text-muted">(<?php echo html_escape(implode(' | ', $spec['hooks'])); ?>)</small></label>
              </div>
            <?php } ?>
          <?php } ?>
          <button type="submit" class="btn btn-primary">Save</button>
          <?php echo form_close(); ?>
        </div></div>
      </div>
      <div class="col-md-4">
        <div class="panel_s"><div class="panel-body">
          <h5>Spool</h5>
          <p><?php echo (int) $spool_size; ?> event(s) waiting for the pipeline.</p>
          <?php if ($paused_until > time()) { ?>
            <p class="text-warning">The pipeline was unreachable: direct sends resume after <?php echo html_escape(date('H:i:s', $paused_until)); ?>; the cron flushes meanwhile.</p>
          <?php } ?>
          <?php if ($last_error['error'] !== '') { ?>
            <p class="text-muted">Last error (<?php echo html_escape(date('Y-m-d H:i:s', $last_error['at'])); ?>): <?php echo html_escape($last_error['error']); ?></p>
          <?php } ?>
          <?php echo form_open(admin_url('perfex_webhooks/flush')); ?>
          <button type="submit" class="btn btn-default">Flush now</button>
          <?php echo form_close(); ?>
          <hr>
          <h5>Send a test event</h5>
          <?php echo form_open(admin_url('perfex_webhooks/test_event')); ?>
          <select name="event" class="form-control">
            <?php foreach (array_keys($map['events']) as $name) { ?>
              <option value="<?php echo html_escape($name); ?>"><?php echo html_escape($name); ?></option>
            <?php } ?>
          </select>
          <p class="text-muted">Resource id <code>test</code>; subscribers of that event receive it.</p>
          <button type="submit" class="btn btn-info">Send test event</button>
          <?php echo form_close(); ?>
          <hr>
          <h5>Not sent by this module</h5>
          <ul class="text-muted">
            <?php foreach ($map['not_sent'] as $name => $why) { ?>
              <li><?php echo html_escape($name); ?>: <?php echo html_escape($why); ?></li>
            <?php } ?>
          </ul>
        </div></div>
      </div>
    </div>
  </div>
</div>
<?php init_tail(); ?>
</body>
</html>
